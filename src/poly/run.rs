//! The host side of the poly passes: pass 1 per key chunk, the reduction of its splits, the f16
//! pack (tensor cores), and pass 2 per query chunk.

use std::sync::Arc;

use super::causal::Extras;
use super::features::{pack_indices, query_weights, FeatureTable};
use super::fit::Poly;
use super::kernel_common::{
    reduce_source_with, word_slices, Pass1Params, Pass2Params, ReduceParams, Variant,
};
use super::kernel_coop::{coop_pack_source, coop_pass1_source, coop_pass2_source, PackParams};
use super::kernel_f32::{pass1_source_with, pass2_source_variant};
use super::plan::{PolyPlan, AUX_THREADS};
use super::prepass::Prepass;
use crate::api::Problem;
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{overlap, Launch, RunOptions, RunStats, Submitted};
use crate::transfer::{
    assign_slice, gather, read_f32, storage_buffer, storage_buffer_with, upload, Uploads,
};

/// Passes 1 and 2 for a planned degree. `weights` are the per-feature query weights (f64 -> f32).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    table: &FeatureTable,
    poly: &Poly,
    pre: &Prepass,
    (q, k, v): (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<f32>, Error> {
    let call = (table, poly, pre, Extras::default());
    Ok(run_with(gpu, p, plan, call, (q, k, v), opts, uploads, stats)?.0)
}

/// [`run`] writing the output `(units*group, l, ev)` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn run_into(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    (table, poly, pre): (&FeatureTable, &Poly, &Prepass),
    xs: (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<(), Error> {
    let call = (table, poly, pre, Extras::default());
    run_with_into(gpu, p, plan, call, xs, opts, uploads, stats, out)?;
    Ok(())
}

/// [`run`] with the primitive's [`Extras`]. Gates weigh key j by exp(G_last - G_j) in pass 1
/// and query row i by exp(G_i - G_last) on the host (where the output is unnormalized; a
/// normalised row does not change), the initial state counts as keys before the first with
/// decay exp(G_last), and the returned state is S' (relative to G_last).
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    call: (&FeatureTable, &Poly, &Prepass, Extras<'_>),
    xs: (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<(Vec<f32>, Option<Vec<f32>>), Error> {
    let mut out = vec![0f32; p.query_heads() * p.l * p.ev];
    let state = run_with_into(gpu, p, plan, call, xs, opts, uploads, stats, &mut out)?;
    Ok((out, state))
}

/// [`run_with`] writing the output into `out`; returns the state where asked for.
#[allow(clippy::too_many_arguments)]
fn run_with_into(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    (table, poly, pre, extras): (&FeatureTable, &Poly, &Prepass, Extras<'_>),
    (q, k, v): (&[f32], &[f32], &[f32]),
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
    out: &mut [f32],
) -> Result<Option<Vec<f32>>, Error> {
    debug_assert_eq!(out.len(), p.query_heads() * p.l * p.ev);
    let variant = extras.variant;
    let g_last = |u: usize| extras.gates.map_or(0.0, |g| g[(u + 1) * p.s - 1]);
    let key_w: Option<Vec<f32>> = extras.gates.map(|g| {
        (0..p.units)
            .flat_map(|u| {
                let last = g_last(u);
                g[u * p.s..(u + 1) * p.s]
                    .iter()
                    .map(move |&gj| (last - gj).exp() as f32)
            })
            .collect()
    });
    let idx = pack_indices(table);
    let weights: Vec<f32> = query_weights(table, poly, f64::from(p.scale))
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let pipelines = Pipelines::new(gpu, plan, opts, variant)?;
    let mut state = extras.return_state.then(Vec::new);
    gpu.checked(|| {
        let (c, rows) = (&plan.chunking, plan.r * (p.ev + 1));
        let idx_buf = storage_buffer_with(gpu, bytemuck::cast_slice(&idx), "feature indices");
        let w_buf = storage_buffer_with(gpu, bytemuck::cast_slice(&weights), "feature weights");
        let run = PolyRun {
            gpu,
            p,
            plan,
            pre,
            opts,
            uploads,
            pipelines: &pipelines,
            k_scale: key_scale(pre),
            idx_buf,
            w_buf,
            sp_buf: storage_buffer(gpu, c.units * rows, "S'"),
            partial_buf: storage_buffer(gpu, c.units * plan.splits * rows, "partial S'"),
            key_w: key_w.as_deref(),
        };
        for u0 in (0..p.units).step_by(c.units) {
            let nu = c.units.min(p.units - u0);
            let mu = &pre.mu[u0 * p.e..(u0 + nu) * p.e];
            let mu_buf = storage_buffer_with(gpu, bytemuck::cast_slice(mu), "mu");
            // The initial state, decayed to the last key, is where the key sums start.
            let started = extras.initial_state.map(|s0| {
                let s0: Vec<f32> = (u0..u0 + nu)
                    .flat_map(|u| {
                        let decay = g_last(u).exp();
                        s0[u * rows..(u + 1) * rows]
                            .iter()
                            .map(move |&x| (f64::from(x) * decay) as f32)
                    })
                    .collect();
                upload(gpu, &run.sp_buf, bytemuck::cast_slice(&s0));
            });
            let vn_bufs = plan
                .coop
                .map(|_| (run.value_norm(u0, nu, true), run.value_norm(u0, nu, false)));
            run.pass1(
                (k, v),
                (u0, nu),
                &mu_buf,
                vn_bufs.as_ref().map(|b| &b.0),
                started.is_some(),
                stats,
            )?;
            if let Some(st) = &mut state {
                st.extend(read_f32(gpu, &run.sp_buf, nu * rows)?);
            }
            let packed = run.pack(nu, stats)?;
            let vn2 = vn_bufs.as_ref().map(|b| &b.1);
            run.pass2(q, (u0, nu), packed.as_ref().zip(vn2), out, stats)?;
        }
        Ok(())
    })?;
    if let (Some(g), true) = (extras.gates, variant.unnormalized) {
        for (h, rows) in out.chunks_mut(p.l * p.ev).enumerate() {
            let u = h / p.group;
            for (i, row) in rows.chunks_mut(p.ev).enumerate() {
                let f = (g[u * p.s + i] - g_last(u)).exp();
                row.iter_mut().for_each(|x| *x = (f64::from(*x) * f) as f32);
            }
        }
    }
    Ok(state)
}

/// The coop passes scale keys into [-1, 1] by the largest centred key norm (queries by its
/// inverse); 1 where that norm is zero or not finite.
fn key_scale(pre: &Prepass) -> f32 {
    let k_scale = pre.k_max_norm.iter().copied().fold(0.0, f64::max);
    if k_scale > 0.0 && k_scale.is_finite() {
        k_scale as f32
    } else {
        1.0
    }
}

/// The compiled kernels of a poly plan: both passes (f32 or coop), the reduction of the key
/// splits and, for coop, the pack of S' into f16.
struct Pipelines {
    pass1: Arc<wgpu::ComputePipeline>,
    reduce: Arc<wgpu::ComputePipeline>,
    pack: Option<Arc<wgpu::ComputePipeline>>,
    pass2: Arc<wgpu::ComputePipeline>,
}

impl Pipelines {
    fn new(gpu: &Gpu, plan: &PolyPlan, opts: &RunOptions, v: Variant) -> Result<Self, Error> {
        let (src1, src2, key1, key2) = match &plan.coop {
            Some(t) => (
                coop_pass1_source(t, opts.count_io),
                coop_pass2_source(t, opts.count_io),
                format!("coop1:{t:?}"),
                format!("coop2:{t:?}"),
            ),
            None => (
                pass1_source_with(&plan.pass1, opts.count_io, v.gated),
                pass2_source_variant(
                    &plan.pass2,
                    opts.count_io,
                    false,
                    Variant {
                        gated: false,
                        feature_range: plan.pass2_ranges > 1,
                        ..v
                    },
                ),
                format!("pass1:{:?}", plan.pass1),
                format!("pass2:{:?}", plan.pass2),
            ),
        };
        let mode = format!("{}:{}:{v:?}", opts.count_io, opts.trusted);
        let pass1 = gpu.pipeline(&format!("{key1}:{mode}"), &src1, opts.trusted)?;
        let key2 = format!("{key2}:ranges{}", plan.pass2_ranges > 1);
        let words = plan.r * (plan.pass1.ev + 1);
        let sliced = word_slices(words, gpu.info.max_compute_workgroups_per_dimension).len() > 1;
        let reduce = gpu.pipeline(
            &format!("reduce:{sliced}:{mode}"),
            &reduce_source_with(opts.count_io, sliced),
            opts.trusted,
        )?;
        let pack = match &plan.coop {
            Some(t) => Some(gpu.pipeline(
                &format!("coop_pack:{t:?}:{mode}"),
                &coop_pack_source(t, opts.count_io),
                opts.trusted,
            )?),
            None => None,
        };
        let pass2 = gpu.pipeline(&format!("{key2}:{mode}"), &src2, opts.trusted)?;
        Ok(Pipelines {
            pass1,
            reduce,
            pack,
            pass2,
        })
    }
}

/// One run of the poly passes: its problem, plan, pre-pass and the buffers every unit chunk shares
/// (feature table, S' and the partial S' of the key splits).
struct PolyRun<'a> {
    gpu: &'a Gpu,
    p: &'a Problem,
    plan: &'a PolyPlan,
    pre: &'a Prepass,
    opts: &'a RunOptions,
    uploads: &'a Uploads,
    pipelines: &'a Pipelines,
    k_scale: f32,
    idx_buf: wgpu::Buffer,
    w_buf: wgpu::Buffer,
    sp_buf: wgpu::Buffer,
    partial_buf: wgpu::Buffer,
    /// Per key row (units x S): the gate weight of pass 1, where gated.
    key_w: Option<&'a [f32]>,
}

impl PolyRun<'_> {
    /// Per unit of `u0..u0+nu`: vmin, then 1/range (pass 1, `invert`) or range (pass 2) of each
    /// value column.
    fn value_norm(&self, u0: usize, nu: usize, invert: bool) -> wgpu::Buffer {
        let (p, pre) = (self.p, self.pre);
        let mut out = Vec::with_capacity(nu * 2 * p.ev);
        for u in u0..u0 + nu {
            let (lo, hi) = (
                &pre.v_min[u * p.ev..(u + 1) * p.ev],
                &pre.v_max[u * p.ev..(u + 1) * p.ev],
            );
            out.extend(lo.iter().map(|&x| x as f32));
            out.extend(lo.iter().zip(hi).map(|(&a, &b)| {
                let range = if b > a { (b - a) as f32 } else { 1.0 };
                if invert {
                    1.0 / range
                } else {
                    range
                }
            }));
        }
        storage_buffer_with(self.gpu, bytemuck::cast_slice(&out), "value normalisation")
    }

    /// Pass 1 and the reduction of its key splits, one key chunk at a time (S' is a sum over
    /// keys): S' of units `u0..u0+nu` in `sp_buf`.
    fn pass1(
        &self,
        (k, v): (&[f32], &[f32]),
        (u0, nu): (usize, usize),
        mu_buf: &wgpu::Buffer,
        vn1: Option<&wgpu::Buffer>,
        started: bool,
        stats: &mut RunStats,
    ) -> Result<(), Error> {
        let (gpu, p, plan) = (self.gpu, self.p, self.plan);
        let c = &plan.chunking;
        for (ci, s0) in (0..p.s).step_by(c.kv_rows).enumerate() {
            let sc = c.kv_rows.min(p.s - s0);
            let kc = gather(k, u0, nu, p.s, s0, sc, p.e);
            let vc = gather(v, u0, nu, p.s, s0, sc, p.ev);
            let k_buf = self.uploads.buffer(gpu, kc, "k");
            let v_buf = self.uploads.buffer(gpu, vc, "v");
            let kw_buf = self.key_w.map(|w| {
                let wc = gather(w, u0, nu, p.s, s0, sc, 1);
                storage_buffer_with(gpu, bytemuck::cast_slice(&wc.to_vec()), "key weights")
            });
            let keys_per_split = plan.keys_per_split.min(sc);
            let splits = sc.div_ceil(keys_per_split);
            let params = Pass1Params {
                s: sc as u32,
                keys_per_split: keys_per_split as u32,
                splits: splits as u32,
                k_inv_scale: 1.0 / self.k_scale,
            };
            let (bufs, chunks1) = match (&plan.coop, vn1) {
                (Some(t), Some(vn1)) => (
                    vec![
                        &*k_buf,
                        &*v_buf,
                        mu_buf,
                        &self.idx_buf,
                        vn1,
                        &self.partial_buf,
                    ],
                    t.chunks1(),
                ),
                _ => {
                    let mut b = vec![&*k_buf, &*v_buf, mu_buf, &self.idx_buf, &self.partial_buf];
                    b.extend(kw_buf.as_ref());
                    (b, plan.pass1.chunks())
                }
            };
            let (_, st) = Launch {
                pass: "pass1",
                pipeline: &self.pipelines.pass1,
                params: &params,
                buffers: &bufs,
                grid: (splits as u32, chunks1 as u32, nu as u32),
            }
            .run(gpu, self.opts, &[])?;
            stats.absorb(&st);
            let words = plan.r * (p.ev + 1);
            let max_groups = gpu.info.max_compute_workgroups_per_dimension;
            for (first_word, groups) in word_slices(words, max_groups) {
                let params = ReduceParams {
                    splits: splits as u32,
                    accumulate: u32::from(ci > 0 || started),
                    words: words as u32,
                    first_word: first_word as u32,
                };
                let (_, st) = Launch {
                    pass: "reduce",
                    pipeline: &self.pipelines.reduce,
                    params: &params,
                    buffers: &[&self.partial_buf, &self.sp_buf],
                    grid: (groups as u32, nu as u32, 1),
                }
                .run(gpu, self.opts, &[])?;
                stats.absorb(&st);
            }
        }
        Ok(())
    }

    /// Coop pass 2 reads S'' = S' / keys in f16 and the normaliser column z: both packed here
    /// (nothing on the f32 path).
    fn pack(
        &self,
        nu: usize,
        stats: &mut RunStats,
    ) -> Result<Option<(wgpu::Buffer, wgpu::Buffer)>, Error> {
        let (Some(t), Some(pack)) = (&self.plan.coop, &self.pipelines.pack) else {
            return Ok(None);
        };
        let gpu = self.gpu;
        let s16 = storage_buffer(gpu, (nu * t.rp() * t.padded_ev()).div_ceil(2), "S''");
        let z = storage_buffer(gpu, nu * t.rp(), "z");
        let params = PackParams {
            inv_keys: 1.0 / self.p.s as f32,
            _pad: [0.0; 3],
        };
        let (_, st) = Launch {
            pass: "pack",
            pipeline: pack,
            params: &params,
            buffers: &[&self.sp_buf, &s16, &z],
            grid: (
                (t.rp() * t.padded_ev()).div_ceil(AUX_THREADS) as u32,
                nu as u32,
                1,
            ),
        }
        .run(gpu, self.opts, &[])?;
        stats.absorb(&st);
        Ok(Some((s16, z)))
    }

    /// Pass 2, one query chunk at a time, into `out`; `coop` holds S'', z and the value
    /// normalisation of the tensor-core pass.
    fn pass2(
        &self,
        q: &[f32],
        (u0, nu): (usize, usize),
        coop: Option<(&(wgpu::Buffer, wgpu::Buffer), &wgpu::Buffer)>,
        out: &mut [f32],
        stats: &mut RunStats,
    ) -> Result<(), Error> {
        let (gpu, p, plan) = (self.gpu, self.p, self.plan);
        let c = &plan.chunking;
        let mut reading: Option<(Submitted<'_>, (usize, usize))> = None;
        for l0 in (0..p.l).step_by(c.q_rows) {
            let lc = c.q_rows.min(p.l - l0);
            let qh = nu * p.group;
            let qc = gather(q, u0 * p.group, qh, p.l, l0, lc, p.e);
            let q_buf = self.uploads.buffer(gpu, qc, "q");
            let o_words = qh * lc * p.ev;
            let o_buf = self.uploads.scratch(gpu, o_words, "o");
            let (b, chunks2) = match &plan.coop {
                Some(t) => (t.b2(), t.chunks2()),
                None => (plan.pass2.b, plan.pass2.chunks()),
            };
            let blocks = lc.div_ceil(b);
            // A split pass 2 sums its ranges' [num | D] rows here (see Variant::feature_range).
            let ranged = plan.coop.is_none() && plan.pass2_ranges > 1;
            let sums = ranged.then(|| storage_buffer(gpu, qh * lc * (p.ev + 1), "range sums"));
            let per_range = if ranged {
                plan.pass2.chunks_per_range(plan.pass2_ranges)
            } else {
                chunks2
            };
            for chunk0 in (0..chunks2).step_by(per_range) {
                let end = (chunk0 + per_range).min(chunks2);
                let params = Pass2Params {
                    l: lc as u32,
                    blocks: blocks as u32,
                    group: p.group as u32,
                    chunks: end as u32,
                    k_scale: self.k_scale,
                    keys: p.s as f32,
                    _pad: 0,
                    chunk0: chunk0 as u32,
                };
                let mut bufs = match coop {
                    Some(((s16, z), vn2)) => {
                        vec![&*q_buf, s16, z, &self.idx_buf, &self.w_buf, vn2, &*o_buf]
                    }
                    None => vec![&*q_buf, &self.sp_buf, &self.idx_buf, &self.w_buf, &*o_buf],
                };
                bufs.extend(sums.as_ref());
                let launch = Launch {
                    pass: "pass2",
                    pipeline: &self.pipelines.pass2,
                    params: &params,
                    buffers: &bufs,
                    grid: (plan.pass2_workgroups.min(blocks) as u32, qh as u32, 1),
                };
                if end < chunks2 {
                    // A range before the last adds into `sums`: nothing to read back yet.
                    let (_, st) = launch.run(gpu, self.opts, &[])?;
                    stats.absorb(&st);
                    continue;
                }
                // This chunk's output is read back while the next chunk runs.
                let sub = launch.submit(gpu, self.opts, &[(&o_buf, o_words)]);
                if let Some((prev, rows)) = reading.take() {
                    self.place(prev, u0, rows, out, stats)?;
                }
                reading = Some((sub, (l0, lc)));
                if !overlap() {
                    if let Some((sub, rows)) = reading.take() {
                        self.place(sub, u0, rows, out, stats)?;
                    }
                }
            }
        }
        if let Some((sub, rows)) = reading {
            self.place(sub, u0, rows, out, stats)?;
        }
        Ok(())
    }

    /// Waits for a pass-2 dispatch over query rows `l0..l0+lc` of units `u0..` and copies its
    /// output into place.
    fn place(
        &self,
        sub: Submitted<'_>,
        u0: usize,
        (l0, lc): (usize, usize),
        out: &mut [f32],
        stats: &mut RunStats,
    ) -> Result<(), Error> {
        let p = self.p;
        let ((), st) = sub.finish(self.gpu, |oc| {
            if oc.len() == out.len() {
                // One dispatch for the whole output: one copy into place.
                assign_slice(out, oc);
                return;
            }
            for (h, rows) in oc.chunks(lc * p.ev).enumerate() {
                // The chunk's rows of one head are consecutive rows of the output.
                let dst = ((u0 * p.group + h) * p.l + l0) * p.ev;
                out[dst..dst + lc * p.ev].copy_from_slice(rows);
            }
        })?;
        stats.absorb(&st);
        Ok(())
    }
}
