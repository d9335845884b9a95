//! The host loop of the exact kernel: cuts the problem into dispatches and merges split-KV partial
//! results.

use std::sync::Arc;

use super::kernel::{shader_source_for, Params};
use super::plan::{ExactPlan, ExactTiles};
use super::storage::{F16Inputs, Storage};
use crate::api::Problem;
use crate::chunking::{chunks, Chunk, Chunking};
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{overlap, Launch, RunOptions, RunStats, Submitted};
use crate::transfer::{assign_slice, gather, storage_buffer, upload_rows};

/// Runs exact attention. `q`, `k`, `v` are contiguous `(units*group, l, e)`, `(units, s, e)`,
/// `(units, s, ev)`; the result is `(units*group, l, ev)`.
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &ExactPlan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
) -> Result<(Vec<f32>, RunStats), Error> {
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let stats = run_into(gpu, p, plan, q, k, v, opts, &mut out)?;
    Ok((out, stats))
}

/// Runs exact attention on inputs stored as f16 (`F16Inputs`, packed two to a word) into `out`:
/// the f32 kernel's schedule and arithmetic, half the words uploaded and read.
pub fn run_f16(
    gpu: &Gpu,
    p: &Problem,
    plan: &ExactPlan,
    xs: &F16Inputs,
    opts: &RunOptions,
    out: &mut [f32],
) -> Result<RunStats, Error> {
    let pipeline = pipeline(gpu, &plan.tiles, Storage::F16, opts)?;
    let kernel = ExactKernel {
        pass: "exact",
        pipeline: &pipeline,
        bq: plan.tiles.bq,
    };
    // The packed words travel as f32 slices: the host loop only copies them (bit for bit).
    fn words(x: &[u32]) -> &[f32] {
        bytemuck::cast_slice(x)
    }
    let widths = (Storage::F16.row_words(p.e), Storage::F16.row_words(p.ev));
    let xs = (words(&xs.q), words(&xs.k), words(&xs.v));
    let c = &plan.chunking;
    let (_, stats) = run_kernel_stats(gpu, p, c, &kernel, xs, widths, opts, false, out)?;
    Ok(stats)
}

/// [`run`] writing the output `(units*group, l, ev)` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn run_into(
    gpu: &Gpu,
    p: &Problem,
    plan: &ExactPlan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
    out: &mut [f32],
) -> Result<RunStats, Error> {
    let pipeline = pipeline(gpu, &plan.tiles, Storage::F32, opts)?;
    let kernel = ExactKernel {
        pass: "exact",
        pipeline: &pipeline,
        bq: plan.tiles.bq,
    };
    let widths = (p.e, p.ev);
    let (_, stats) = run_kernel_stats(
        gpu,
        p,
        &plan.chunking,
        &kernel,
        (q, k, v),
        widths,
        opts,
        false,
        out,
    )?;
    Ok(stats)
}

/// The f32 kernel's pipeline for inputs stored in `storage` (cached by tiles, storage and
/// options).
fn pipeline(
    gpu: &Gpu,
    t: &ExactTiles,
    storage: Storage,
    opts: &RunOptions,
) -> Result<Arc<wgpu::ComputePipeline>, Error> {
    let name = match storage {
        Storage::F32 => "exact",
        Storage::F16 => "exact_f16",
    };
    let key = format!("{name}:{t:?}:{}:{}", opts.count_io, opts.trusted);
    let source = shader_source_for(t, opts.count_io, storage);
    gpu.pipeline(&key, &source, opts.trusted)
}

/// A compiled exact kernel (f32 or cooperative-matrix): both take [`Params`] and the bindings
/// q, k, v, o, stats, and cover `bq` query rows per workgroup.
pub(crate) struct ExactKernel<'a> {
    pub pass: &'static str,
    pub pipeline: &'a wgpu::ComputePipeline,
    pub bq: usize,
}

/// Runs exact attention and also returns each output row's log-sum-exp,
/// `ln sum_j exp(scale q_i.k_j)` over its visible keys (`(units*group, l)`; -inf for a row that
/// sees no key): the kernel's per-row statistics (running maximum m and sum l, log2 domain),
/// written as for split-KV dispatches, give `ln 2 (m + log2 l)`. The shader is the same one.
pub fn run_with_lse(
    gpu: &Gpu,
    p: &Problem,
    plan: &ExactPlan,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
) -> Result<(Vec<f32>, Vec<f32>, RunStats), Error> {
    let pipeline = pipeline(gpu, &plan.tiles, Storage::F32, opts)?;
    let kernel = ExactKernel {
        pass: "exact",
        pipeline: &pipeline,
        bq: plan.tiles.bq,
    };
    let widths = (p.e, p.ev);
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let (lse, stats) = run_kernel_stats(
        gpu,
        p,
        &plan.chunking,
        &kernel,
        (q, k, v),
        widths,
        opts,
        true,
        &mut out,
    )?;
    Ok((out, lse.unwrap_or_default(), stats))
}

/// The host loop of every exact kernel: cuts the problem into the dispatches of `c` and merges
/// split-KV partial results. Rows of Q/K and of V take `widths` words in storage ((E, Ev) for
/// f32; the words of packed f16 rows travel as f32 slices, copied bit for bit).
pub(crate) fn run_kernel(
    gpu: &Gpu,
    p: &Problem,
    c: &Chunking,
    kernel: &ExactKernel<'_>,
    xs: (&[f32], &[f32], &[f32]),
    widths: (usize, usize),
    opts: &RunOptions,
) -> Result<(Vec<f32>, RunStats), Error> {
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let (_, stats) = run_kernel_stats(gpu, p, c, kernel, xs, widths, opts, false, &mut out)?;
    Ok((out, stats))
}

/// Row log-sum-exp (where asked for) and statistics of a run.
type KernelRun = (Option<Vec<f32>>, RunStats);

/// [`run_kernel`] into `out`; with `want_lse` every dispatch writes its rows' (m, l) and the
/// merged rows' log-sum-exp is returned too. Rows of Q/K and of V take `qk_words` and `v_words`
/// words in storage (E and Ev for f32). Each dispatch's output is placed (or merged) into `out`
/// straight from the mapped readback.
#[allow(clippy::too_many_arguments)]
fn run_kernel_stats(
    gpu: &Gpu,
    p: &Problem,
    c: &Chunking,
    kernel: &ExactKernel<'_>,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (qk_words, v_words): (usize, usize),
    opts: &RunOptions,
    want_lse: bool,
    out: &mut [f32],
) -> Result<KernelRun, Error> {
    // With want_lse the rows go through the split-KV merge even in one dispatch.
    let split_kv = c.kv_rows < p.s || want_lse;
    let [q_buf, k_buf, v_buf, o_buf, stats_buf] =
        kernel_buffers(gpu, p, c, (qk_words, v_words), split_kv);

    debug_assert_eq!(out.len(), p.query_heads() * p.l * p.ev);
    if split_kv {
        // The merge weighs what `out` holds (a caller's array, uninitialised) by 0 at first:
        // 0 x NaN would stay NaN.
        out.fill(0.0);
    }
    let mut merge = split_kv.then(|| SplitMerge::new(p));
    let mut stats = RunStats::default();
    // The key/value slice in the buffers: consecutive dispatches with the same one (one key
    // chunk, several query chunks) upload it once.
    let mut kv_in_place = None;
    let mut place = |(sub, ch, o_words): (Submitted<'_>, Chunk, usize), stats: &mut RunStats| {
        let ((), st) = sub.finish(gpu, |read| {
            let (o_chunk, st_chunk) = read.split_at(o_words);
            match &mut merge {
                Some(m) => m.absorb(p, &ch, o_chunk, st_chunk, out),
                // One dispatch for the whole output: one copy into place.
                None if o_chunk.len() == out.len() => assign_slice(out, o_chunk),
                None => place_rows(p, &ch, o_chunk, out),
            }
        })?;
        stats.absorb(&st);
        Ok::<(), Error>(())
    };
    let mut reading = None;
    for ch in chunks(p, c) {
        let qh = ch.units * p.group;
        let qc = gather(q, ch.unit0 * p.group, qh, p.l, ch.l0, ch.lc, qk_words);
        let kv_slice = (ch.unit0, ch.units, ch.s0, ch.sc);
        let kv = (kv_in_place != Some(kv_slice)).then(|| {
            (
                gather(k, ch.unit0, ch.units, p.s, ch.s0, ch.sc, qk_words),
                gather(v, ch.unit0, ch.units, p.s, ch.s0, ch.sc, v_words),
            )
        });
        kv_in_place = Some(kv_slice);
        let params = dispatch_params(p, &ch, split_kv);
        let o_words = qh * ch.lc * p.ev;
        let s_words = if split_kv { qh * ch.lc * 2 } else { 0 };
        let sub = gpu.checked(|| {
            upload_rows(gpu, &q_buf, &qc);
            if let Some((kc, vc)) = &kv {
                upload_rows(gpu, &k_buf, kc);
                upload_rows(gpu, &v_buf, vc);
            }
            Ok(Launch {
                pass: kernel.pass,
                pipeline: kernel.pipeline,
                params: &params,
                buffers: &[&q_buf, &k_buf, &v_buf, &o_buf, &stats_buf],
                grid: (ch.lc.div_ceil(kernel.bq) as u32, qh as u32, 1),
            }
            .submit(gpu, opts, &[(&o_buf, o_words), (&stats_buf, s_words)]))
        })?;
        // The previous dispatch's output is placed while this one runs (the next upload into
        // the same buffers is queued after it).
        if let Some(prev) = reading.take() {
            place(prev, &mut stats)?;
        }
        reading = Some((sub, ch, o_words));
        if !overlap() {
            if let Some(this) = reading.take() {
                place(this, &mut stats)?;
            }
        }
    }
    if let Some(last) = reading {
        place(last, &mut stats)?;
    }
    Ok((merge.filter(|_| want_lse).map(|m| m.lse()), stats))
}

/// The storage buffers of one exact call (q, k, v, o, stats), sized for its largest dispatch;
/// stats holds (m, l) per row only where the keys are split.
fn kernel_buffers(
    gpu: &Gpu,
    p: &Problem,
    c: &Chunking,
    (qk_words, v_words): (usize, usize),
    split_kv: bool,
) -> [wgpu::Buffer; 5] {
    let stats_words = if split_kv {
        c.units * p.group * c.q_rows * 2
    } else {
        1
    };
    [
        storage_buffer(gpu, c.units * p.group * c.q_rows * qk_words, "q"),
        storage_buffer(gpu, c.units * c.kv_rows * qk_words, "k"),
        storage_buffer(gpu, c.units * c.kv_rows * v_words, "v"),
        storage_buffer(gpu, c.units * p.group * c.q_rows * p.ev, "o"),
        storage_buffer(gpu, stats_words, "stats"),
    ]
}

/// The kernel's parameters for one dispatch.
fn dispatch_params(p: &Problem, ch: &Chunk, split_kv: bool) -> Params {
    Params {
        l: ch.lc as u32,
        s: ch.sc as u32,
        group: p.group as u32,
        causal: u32::from(p.causal),
        q_offset: ch.l0 as u32,
        kv_offset: ch.s0 as u32,
        write_stats: u32::from(split_kv),
        scale_log2: p.scale * std::f32::consts::LOG2_E,
    }
}

/// Copies a chunk's output rows `(heads, lc, ev)` to their places in the whole output.
fn place_rows(p: &Problem, ch: &Chunk, o_chunk: &[f32], out: &mut [f32]) {
    let qh0 = ch.unit0 * p.group;
    for h in 0..ch.units * p.group {
        for r in 0..ch.lc {
            let row = (qh0 + h) * p.l + ch.l0 + r;
            let src = &o_chunk[(h * ch.lc + r) * p.ev..(h * ch.lc + r + 1) * p.ev];
            out[row * p.ev..(row + 1) * p.ev].copy_from_slice(src);
        }
    }
}

/// Running softmax statistics (log2 domain) of the merged split-KV chunks, per output row.
struct SplitMerge {
    run_m: Vec<f64>,
    run_l: Vec<f64>,
}

impl SplitMerge {
    /// Each merged row's natural log-sum-exp.
    fn lse(&self) -> Vec<f32> {
        self.run_m
            .iter()
            .zip(&self.run_l)
            .map(|(&m, &l)| ((m + l.log2()) * std::f64::consts::LN_2) as f32)
            .collect()
    }

    fn new(p: &Problem) -> Self {
        let rows = p.query_heads() * p.l;
        SplitMerge {
            run_m: vec![f64::NEG_INFINITY; rows],
            run_l: vec![0f64; rows],
        }
    }

    /// Merges a chunk's normalised rows (with their max `m` and sum `l`, two per row in
    /// `st_chunk`) into `out`, weighting the old and new rows by their softmax mass.
    fn absorb(
        &mut self,
        p: &Problem,
        ch: &Chunk,
        o_chunk: &[f32],
        st_chunk: &[f32],
        out: &mut [f32],
    ) {
        let qh0 = ch.unit0 * p.group;
        for h in 0..ch.units * p.group {
            for r in 0..ch.lc {
                let row = (qh0 + h) * p.l + ch.l0 + r;
                let src = &o_chunk[(h * ch.lc + r) * p.ev..(h * ch.lc + r + 1) * p.ev];
                let dst = &mut out[row * p.ev..(row + 1) * p.ev];
                let (m_c, l_c) = (
                    f64::from(st_chunk[(h * ch.lc + r) * 2]),
                    f64::from(st_chunk[(h * ch.lc + r) * 2 + 1]),
                );
                if l_c <= 0.0 {
                    continue;
                }
                let m_new = self.run_m[row].max(m_c);
                let w_old = self.run_l[row] * (self.run_m[row] - m_new).exp2();
                let w_new = l_c * (m_c - m_new).exp2();
                let total = w_old + w_new;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = ((f64::from(*d) * w_old + f64::from(*s) * w_new) / total) as f32;
                }
                self.run_m[row] = m_new;
                self.run_l[row] = total;
            }
        }
    }
}
