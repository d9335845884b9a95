//! Decoding with a device-resident recurrent state: [`DeviceState`] keeps the state of
//! polynomial attention (per KV unit `Σ_j exp(G_last − G_j) φ_k(k_j) [v_j | 1]`, r × (Ev + 1)
//! words, the layout of [`super::primitive`]'s `initial_state` / returned state) in GPU memory
//! between steps, so a step moves only the new tokens' q, k, v (and gates) up and their outputs
//! back: `units·(group·E + E + Ev + 1)` words up and `units·group·Ev` words down per token,
//! instead of the state both ways and the causal schedule's dispatches.
//!
//! A step of n tokens (n <= [`MAX_STEP_TOKENS`]) is one queue submission of 2n dispatches and one
//! readback. Per token, `shaders/poly_step.wgsl` splits the r feature rows over workgroups of BR
//! rows per unit: each forms the key's and queries' features of its rows (graded lexicographic
//! monomials, [`super::features`]), writes `dst = exp(log_gate)·src + φ_k(k)[v | 1]` and the
//! partial dot products `φ_q(q)·dst` of its rows; `shaders/poly_step_reduce.wgsl` sums them over
//! the blocks in order (numerator and normaliser) and divides. Updating before reading gives the
//! causal semantics of a chunked call: the token attends to itself and everything before.
//!
//! The step reads one state buffer and writes another, so the state before the step stays intact
//! until every output is known finite; a step whose outputs are not finite leaves the state as it
//! was (the caller then raises, as the host path does).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

use super::features::query_weights;
use super::fit::{FitKind, Poly};
use super::primitive::kernel_features;
use crate::device::{self, DeviceInfo, Gpu};
use crate::error::Error;
use crate::transfer::{
    read_f32, read_mapped, readback_buffer, storage_buffer, storage_buffer_with,
};
use crate::wgsl::{fill_fragment, fill_template, Emitter};

const STEP: &str = include_str!("../../shaders/poly_step.wgsl");
const REDUCE: &str = include_str!("../../shaders/poly_step_reduce.wgsl");
const STEP_COLUMN_UNROLLED: &str = include_str!("../../shaders/poly_step_column_unrolled.wgsl");
const STEP_COLUMN_LOOP: &str = include_str!("../../shaders/poly_step_column_loop.wgsl");

/// Most tokens one step submits at once (their inputs and outputs have a slot each); callers
/// split longer inputs or take the chunked path.
pub const MAX_STEP_TOKENS: usize = 16;
/// Feature rows per workgroup of the step kernel (fewer where the fast memory is small). A thread
/// loads its column of them before its first store, so the loads overlap; on lavapipe 64 rows ran
/// a step in less than half the time of 16 (fewer workgroups, each forming the features).
const STEP_ROWS: usize = 64;
/// Most threads of a reduce workgroup (one per share of the blocks).
const REDUCE_THREADS: usize = 64;

/// Sizes of a decoding state: KV units, query heads per unit, E, Ev, the rank r and the degree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub units: usize,
    pub group: usize,
    pub e: usize,
    pub ev: usize,
    pub r: usize,
    pub g: usize,
}

impl StepShape {
    /// Words of the state: units x r x (Ev + 1).
    pub fn state_words(&self) -> usize {
        self.units * self.r * (self.ev + 1)
    }
    /// Words of one token's inputs: queries, keys, values and a log gate per unit.
    fn token_words(&self) -> usize {
        self.units * (self.group * self.e + self.e + self.ev + 1)
    }
    /// Words of one token's outputs.
    fn out_words(&self) -> usize {
        self.units * self.group * self.ev
    }
}

/// Workgroup rows and threads of the step kernel for this shape and device.
fn step_tiles(s: &StepShape, gpu: &Gpu) -> Result<(usize, usize), Error> {
    let fast = gpu.info.fast_memory_words as usize;
    let mut br = STEP_ROWS;
    while br > 1 && br * (s.group + 1) > fast {
        br /= 2;
    }
    if br * (s.group + 1) > fast {
        return Err(Error::TooLarge(format!(
            "decoding with {} query heads per key/value head: their features of one state row \
             exceed the {fast} words of workgroup memory",
            s.group
        )));
    }
    // One thread per state column (Ev + 1), whole warps, at least 64 for the features.
    let max = gpu.info.max_compute_invocations_per_workgroup as usize;
    let wg = (s.ev + 1).next_multiple_of(32).clamp(64, 256).min(max);
    Ok((br, wg))
}

/// WGSL of the step kernel for this shape: `br` feature rows and `wg` threads per workgroup,
/// grid (blocks, units); `gated` reads a log gate per unit; `unrolled`: see [`column_code`].
/// It declares `br · (group + 1)` words of workgroup memory.
pub fn step_source(s: &StepShape, br: usize, wg: usize, gated: bool, unrolled: bool) -> String {
    let decay = if gated {
        "exp(tok[GATE_AT + unit])"
    } else {
        "1.0"
    };
    fill_template(
        STEP,
        &[
            ("E", s.e.to_string()),
            ("EV", s.ev.to_string()),
            ("R", s.r.to_string()),
            ("G", s.g.to_string()),
            ("UNITS", s.units.to_string()),
            ("GROUP", s.group.to_string()),
            ("BR", br.to_string()),
            ("BLOCKS", s.r.div_ceil(br).to_string()),
            ("WG", wg.to_string()),
            ("PHIQ_WORDS", (br * s.group).to_string()),
            ("COLUMN", column_code(br, unrolled)),
            ("DECAY", decay.to_string()),
        ],
    )
}

/// WGSL of the reduce kernel: the sum over `blocks` partial products by `wg` threads (a power of
/// two), grid (Ev, query heads). It declares `2 · wg` words of workgroup memory.
pub fn step_reduce_source(ev: usize, blocks: usize, wg: usize, normalize: bool) -> String {
    let result = if normalize { "num / den" } else { "num" };
    fill_template(
        REDUCE,
        &[
            ("EV", ev.to_string()),
            ("BLOCKS", blocks.to_string()),
            ("WG", wg.to_string()),
            ("RESULT", result.to_string()),
        ],
    )
}

/// The step kernel's work on its column `c` of the block's rows: dst = decay * src + phi_k vc,
/// stored, and per query head the partial dot product with phi_q.
///
/// `unrolled` (GPUs): one `let` per row, so every load is issued before the first store (src and
/// dst may alias as far as the compiler knows: a loop would wait for each load in turn) and the
/// query heads reuse the updated values in registers; rows past the block's last repeat its last
/// row (their features are 0, so they add 0) and are not stored. Otherwise (CPU adapters, where
/// BR live values spill: lavapipe ran a step in half the time this way) a loop over the rows,
/// the query heads after the first reading back what it stored.
fn column_code(br: usize, unrolled: bool) -> String {
    if !unrolled {
        return fill_fragment(STEP_COLUMN_LOOP, &[]).trim_end().to_string();
    }
    let rows = |depth: usize, line: &dyn Fn(usize) -> String| {
        let mut e = Emitter::new(depth);
        for f in 0..br {
            e.line(line(f));
        }
        e.finish()
    };
    let code = fill_fragment(
        STEP_COLUMN_UNROLLED,
        &[
            (
                "LOADS",
                rows(2, &|f| {
                    format!(
                        "let x{f} = src[col0 + min({f}u, last) * EV1] * decay + phik[{f}] * vc;"
                    )
                }),
            ),
            (
                "STORES",
                rows(2, &|f| {
                    format!("if ({f}u < rows) {{ dst[col0 + {f}u * EV1] = x{f}; }}")
                }),
            ),
            (
                "DOTS",
                rows(3, &|f| format!("acc += phiq[p + {f}u] * x{f};")),
            ),
        ],
    );
    code.trim_end().to_string()
}

fn aligned(bytes: usize, align: usize) -> usize {
    bytes.max(4).next_multiple_of(align.max(4))
}

/// A recurrent state of polynomial attention held in GPU memory; see the module docs.
pub struct DeviceState {
    gpu: Arc<Gpu>,
    shape: StepShape,
    normalize: bool,
    br: usize,
    wg: usize,
    blocks: usize,
    /// The column code's form (see [`column_code`]).
    unrolled: bool,
    indices: wgpu::Buffer,
    weights: wgpu::Buffer,
    /// The committed state is `states[cur]`; a step writes the others.
    states: Vec<wgpu::Buffer>,
    cur: usize,
    partial: wgpu::Buffer,
    tokens: wgpu::Buffer,
    out: wgpu::Buffer,
    readback: wgpu::Buffer,
    token_stride: usize,
    out_stride: usize,
    /// Step pipelines without and with gates, compiled on first use.
    step_pipelines: [Option<Arc<wgpu::ComputePipeline>>; 2],
    reduce_pipeline: Arc<wgpu::ComputePipeline>,
    /// Bind groups by (gated, token slot, src, dst) and reduce ones by token slot.
    step_binds: HashMap<(bool, usize, usize, usize), wgpu::BindGroup>,
    reduce_binds: HashMap<usize, wgpu::BindGroup>,
}

/// The lengths of one step's inputs: n tokens of every head (queries), unit (keys, values) and
/// gate.
fn check_step_inputs(
    s: &StepShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    log_gates: Option<&[f32]>,
    n: usize,
) -> Result<(), Error> {
    if n == 0 || n > MAX_STEP_TOKENS {
        return Err(Error::InvalidInput(format!(
            "a device step takes 1 to {MAX_STEP_TOKENS} tokens, got {n}"
        )));
    }
    let heads = s.units * s.group;
    let want = [
        ("query", q.len(), heads * n * s.e),
        ("key", k.len(), s.units * n * s.e),
        ("value", v.len(), s.units * n * s.ev),
        (
            "log_gates",
            log_gates.map_or(s.units * n, <[f32]>::len),
            s.units * n,
        ),
    ];
    for (name, got, want) in want {
        if got != want {
            return Err(Error::InvalidInput(format!(
                "{name} holds {got} values, expected {want} for {n} token(s)"
            )));
        }
    }
    Ok(())
}

/// The arguments of [`DeviceState::new`] that no adapter could take.
fn check_state_args(
    units: usize,
    group: usize,
    e: usize,
    ev: usize,
    scale: f64,
) -> Result<(), Error> {
    if units == 0 || group == 0 || e == 0 || ev == 0 {
        return Err(Error::InvalidInput(format!(
            "a decoding state needs at least one unit, query head, E and Ev, got units={units}, \
             group={group}, E={e}, Ev={ev}"
        )));
    }
    if !scale.is_finite() {
        return Err(Error::InvalidInput(format!(
            "scale must be finite, got {scale}"
        )));
    }
    Ok(())
}

/// Whether this adapter's workgroup grid and storage bindings hold the state and its dispatches.
fn check_state_fits(info: &DeviceInfo, shape: &StepShape, blocks: usize) -> Result<(), Error> {
    let too_large = |what: String| Err(Error::TooLarge(format!("decoding on the GPU: {what}")));
    let StepShape {
        units, group, ev, ..
    } = *shape;
    let grid = info.max_compute_workgroups_per_dimension as usize;
    if blocks > grid || units > grid || units * group > grid || ev > grid {
        return too_large(format!(
            "{blocks} feature blocks, {units} units of {group} heads or Ev = {ev} exceed the \
             workgroup grid ({grid} per dimension)"
        ));
    }
    let bytes = 4 * shape.state_words() as u64;
    if bytes > info.max_storage_buffer_binding_size || bytes > info.max_buffer_size {
        return too_large(format!(
            "a state of {bytes} bytes exceeds one storage binding ({} bytes)",
            info.max_storage_buffer_binding_size
        ));
    }
    Ok(())
}

impl DeviceState {
    /// Uploads `state` (units x r x (Ev + 1) floats, the host layout) for the kernel with these
    /// coefficients and scale (`scale` multiplies q.k inside P, on the query side). `unrolled`:
    /// the step kernel's column code (see [`column_code`]); `None` picks it by the adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: &[f32],
        units: usize,
        group: usize,
        e: usize,
        ev: usize,
        coeffs: &[f64],
        scale: f64,
        normalize: bool,
        unrolled: Option<bool>,
    ) -> Result<Self, Error> {
        check_state_args(units, group, e, ev, scale)?;
        let table = kernel_features(e, coeffs)?;
        let shape = StepShape {
            units,
            group,
            e,
            ev,
            r: table.r,
            g: table.g,
        };
        if state.len() != shape.state_words() {
            return Err(Error::InvalidInput(format!(
                "the state holds {} values, expected {} ({units} KV heads x {} features x {})",
                state.len(),
                shape.state_words(),
                table.r,
                ev + 1
            )));
        }
        let gpu = device::gpu()?;
        let _guard = gpu.exclusive();
        let (br, wg) = step_tiles(&shape, &gpu)?;
        let blocks = table.r.div_ceil(br);
        // A power of two (the tree), at most one thread per block.
        let reduce_wg = REDUCE_THREADS
            .min(blocks.next_power_of_two())
            .min(gpu.info.max_compute_invocations_per_workgroup as usize);
        let info = &gpu.info;
        check_state_fits(info, &shape, blocks)?;
        let poly = Poly {
            degree: table.g,
            beta: 0.0,
            coeffs: coeffs[..=table.g].to_vec(),
            certified_eps: 0.0,
            kind: FitKind::Given,
        };
        let w: Vec<f32> = query_weights(&table, &poly, scale)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let align = info.min_storage_buffer_offset_alignment as usize;
        let token_stride = aligned(4 * shape.token_words(), align);
        let out_stride = aligned(4 * shape.out_words(), align);
        gpu.checked(|| {
            let reduce_src = step_reduce_source(ev, blocks, reduce_wg, normalize);
            let key = format!("poly_step_reduce/{ev}/{blocks}/{reduce_wg}/{normalize}");
            let reduce_pipeline = gpu.pipeline(&key, &reduce_src, false)?;
            let states = vec![
                storage_buffer_with(&gpu, bytemuck::cast_slice(state), "decode_state"),
                storage_buffer(&gpu, shape.state_words(), "decode_state"),
            ];
            let tokens = storage_buffer(&gpu, MAX_STEP_TOKENS * token_stride / 4, "decode_tokens");
            let out = storage_buffer(&gpu, MAX_STEP_TOKENS * out_stride / 4, "decode_out");
            Ok(DeviceState {
                indices: storage_buffer_with(&gpu, bytemuck::cast_slice(&table.indices), "indices"),
                weights: storage_buffer_with(&gpu, bytemuck::cast_slice(&w), "query_weights"),
                partial: storage_buffer(&gpu, units * group * blocks * (ev + 1), "decode_partial"),
                readback: readback_buffer(&gpu, (MAX_STEP_TOKENS * out_stride) as u64),
                gpu: gpu.clone(),
                shape,
                normalize,
                br,
                wg,
                blocks,
                unrolled: unrolled.unwrap_or(gpu.info.device_type != "Cpu"),
                states,
                cur: 0,
                tokens,
                out,
                token_stride,
                out_stride,
                step_pipelines: [None, None],
                reduce_pipeline,
                step_binds: HashMap::new(),
                reduce_binds: HashMap::new(),
            })
        })
    }

    /// Each token's slab: queries, keys, values, gates (the layout the shader reads).
    fn token_slab(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        log_gates: Option<&[f32]>,
        n: usize,
    ) -> Vec<f32> {
        let s = self.shape;
        let heads = s.units * s.group;
        let mut slab = vec![0f32; n * self.token_stride / 4];
        for t in 0..n {
            let mut w = t * self.token_stride / 4;
            for (x, rows, width) in [(q, heads, s.e), (k, s.units, s.e), (v, s.units, s.ev)] {
                for row in 0..rows {
                    let from = (row * n + t) * width;
                    slab[w..w + width].copy_from_slice(&x[from..from + width]);
                    w += width;
                }
            }
            if let Some(g) = log_gates {
                for u in 0..s.units {
                    slab[w + u] = g[u * n + t];
                }
            }
        }
        slab
    }

    pub fn shape(&self) -> StepShape {
        self.shape
    }

    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The device this state lives on, or an error where it was lost since.
    fn live_gpu(&self) -> Result<Arc<Gpu>, Error> {
        match device::current_gpu() {
            Some(g) if Arc::ptr_eq(&g, &self.gpu) => Ok(g),
            _ => Err(Error::DeviceLost(
                "the GPU device holding this decoding state was lost or replaced; restore the \
                 state from a copy saved with to_numpy()"
                    .into(),
            )),
        }
    }

    /// A copy of the state in host memory (units x r x (Ev + 1), the host layout).
    pub fn to_host(&self) -> Result<Vec<f32>, Error> {
        let gpu = self.live_gpu()?;
        let _guard = gpu.exclusive();
        gpu.checked(|| read_f32(&gpu, &self.states[self.cur], self.shape.state_words()))
    }

    fn step_pipeline(&mut self, gated: bool) -> Result<Arc<wgpu::ComputePipeline>, Error> {
        if let Some(p) = &self.step_pipelines[usize::from(gated)] {
            return Ok(p.clone());
        }
        let s = &self.shape;
        let src = step_source(s, self.br, self.wg, gated, self.unrolled);
        let key = format!(
            "poly_step/{}/{}/{}/{}/{}/{}/{}/{}/{gated}/{}",
            s.e, s.ev, s.r, s.g, s.units, s.group, self.br, self.wg, self.unrolled
        );
        let p = self.gpu.pipeline(&key, &src, false)?;
        self.step_pipelines[usize::from(gated)] = Some(p.clone());
        Ok(p)
    }

    /// A bind group of `layout` over these (buffer, offset, bytes) ranges, in binding order.
    fn bind_group(
        gpu: &Gpu,
        label: &str,
        layout: &wgpu::BindGroupLayout,
        ranges: &[(&wgpu::Buffer, usize, usize)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(buffer, offset, bytes))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: offset as u64,
                    size: NonZeroU64::new(bytes as u64),
                }),
            })
            .collect();
        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout,
            entries: &entries,
        })
    }

    /// Consumes n tokens: `q` (units·group, n, E), `k` (units, n, E), `v` (units, n, Ev) and
    /// `log_gates` (units, n) where given, flat. Returns the outputs (units·group, n, Ev) and
    /// whether the state now includes the tokens (false where an output is not finite: the state
    /// is left as before the step).
    pub fn step(
        &mut self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        log_gates: Option<&[f32]>,
        n: usize,
    ) -> Result<(Vec<f32>, bool), Error> {
        let s = self.shape;
        let heads = s.units * s.group;
        check_step_inputs(&s, (q, k, v), log_gates, n)?;
        let gpu = self.live_gpu()?;
        let _guard = gpu.exclusive();
        let slab = self.token_slab((q, k, v), log_gates, n);
        let gated = log_gates.is_some();
        let step = self.step_pipeline(gated)?;
        if n > 1 && self.states.len() < 3 {
            self.states
                .push(storage_buffer(&gpu, s.state_words(), "decode_state"));
        }
        // Token t reads `src` and writes `dst`; the committed state is never written.
        let others: Vec<usize> = (0..self.states.len()).filter(|&i| i != self.cur).collect();
        let pairs: Vec<(usize, usize)> = (0..n)
            .map(|t| {
                let dst = others[t % 2];
                let src = if t == 0 {
                    self.cur
                } else {
                    others[(t - 1) % 2]
                };
                (src, dst)
            })
            .collect();
        let state_bytes = 4 * s.state_words();
        let partial_bytes = 4 * heads * self.blocks * (s.ev + 1);
        for (t, &(src, dst)) in pairs.iter().enumerate() {
            self.step_binds
                .entry((gated, t, src, dst))
                .or_insert_with(|| {
                    let ranges = [
                        (&self.tokens, t * self.token_stride, 4 * s.token_words()),
                        (&self.indices, 0, 4 * s.r * s.g),
                        (&self.weights, 0, 4 * s.r),
                        (&self.states[src], 0, state_bytes),
                        (&self.states[dst], 0, state_bytes),
                        (&self.partial, 0, partial_bytes),
                    ];
                    let layout = step.get_bind_group_layout(0);
                    Self::bind_group(&gpu, "poly_step", &layout, &ranges)
                });
            self.reduce_binds.entry(t).or_insert_with(|| {
                let ranges = [
                    (&self.partial, 0, partial_bytes),
                    (&self.out, t * self.out_stride, 4 * s.out_words()),
                ];
                let layout = self.reduce_pipeline.get_bind_group_layout(0);
                Self::bind_group(&gpu, "poly_step_reduce", &layout, &ranges)
            });
        }
        let out_bytes = (n * self.out_stride) as u64;
        let read = self.submit(&gpu, &step, &slab, &pairs, gated, n, out_bytes);
        if read.is_err() {
            // An interrupted wait leaves its mapping pending: the next step reads into a new one.
            self.readback = readback_buffer(&gpu, (MAX_STEP_TOKENS * self.out_stride) as u64);
        }
        let read = read?;
        let finite = read.iter().all(|x| x.is_finite());
        if finite {
            self.cur = pairs[n - 1].1;
        }
        Ok((read, finite))
    }

    /// Uploads the tokens, runs the step's dispatches in one submission and reads the outputs
    /// back in the caller's layout (head, t, Ev).
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        gpu: &Gpu,
        step: &wgpu::ComputePipeline,
        slab: &[f32],
        pairs: &[(usize, usize)],
        gated: bool,
        n: usize,
        out_bytes: u64,
    ) -> Result<Vec<f32>, Error> {
        let s = self.shape;
        let heads = s.units * s.group;
        gpu.checked(|| {
            gpu.queue
                .write_buffer(&self.tokens, 0, bytemuck::cast_slice(slab));
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for (t, &(src, dst)) in pairs.iter().enumerate() {
                    pass.set_pipeline(step);
                    pass.set_bind_group(0, &self.step_binds[&(gated, t, src, dst)], &[]);
                    pass.dispatch_workgroups(self.blocks as u32, s.units as u32, 1);
                    pass.set_pipeline(&self.reduce_pipeline);
                    pass.set_bind_group(0, &self.reduce_binds[&t], &[]);
                    pass.dispatch_workgroups(s.ev as u32, heads as u32, 1);
                }
            }
            enc.copy_buffer_to_buffer(&self.out, 0, &self.readback, 0, out_bytes);
            gpu.queue.submit([enc.finish()]);
            read_mapped(gpu, &self.readback, out_bytes, |b| {
                let words: &[f32] = bytemuck::cast_slice(b);
                // Slot t holds (head, Ev); the caller's layout is (head, t, Ev).
                let mut out = vec![0f32; heads * n * s.ev];
                for t in 0..n {
                    let slot = &words[t * self.out_stride / 4..][..heads * s.ev];
                    for h in 0..heads {
                        out[(h * n + t) * s.ev..][..s.ev]
                            .copy_from_slice(&slot[h * s.ev..][..s.ev]);
                    }
                }
                out
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_are_aligned_and_hold_every_input() {
        let s = StepShape {
            units: 8,
            group: 2,
            e: 64,
            ev: 63,
            r: 2145,
            g: 2,
        };
        assert_eq!(s.token_words(), 8 * (2 * 64 + 64 + 63 + 1));
        for align in [4usize, 64, 256] {
            let stride = aligned(4 * s.token_words(), align);
            assert_eq!(stride % align, 0);
            assert!(stride >= 4 * s.token_words() && stride < 4 * s.token_words() + align);
        }
        assert_eq!(aligned(0, 256), 256);
    }
}
