//! The host side of the poly passes: pass 1 per key chunk, the reduction of its splits, the f16
//! pack (tensor cores), and pass 2 per query chunk.

use super::features::{pack_indices, query_weights, FeatureTable};
use super::fit::Poly;
use super::kernel_common::reduce_source;
use super::kernel_coop::{coop_pack_source, coop_pass1_source, coop_pass2_source};
use super::kernel_f32::{pass1_source, pass2_source};
use super::plan::{PolyPlan, AUX_THREADS};
use super::prepass::Prepass;
use crate::api::Problem;
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{dispatch_no_read, dispatch_one, RunOptions, RunStats};
use crate::transfer::{gather, storage_buffer, uniform_buffer, Uploads};

/// Passes 1 and 2 for a planned degree. `weights` are the per-feature query weights (f64 -> f32).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    p: &Problem,
    plan: &PolyPlan,
    table: &FeatureTable,
    poly: &Poly,
    pre: &Prepass,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<f32>, Error> {
    let c = &plan.chunking;
    let ev1 = p.ev + 1;
    let r = plan.r;
    let idx = pack_indices(table);
    let weights: Vec<f32> = query_weights(table, poly, f64::from(p.scale))
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let coop = plan.coop;
    let (src1, src2, key1, key2) = match &coop {
        Some(t) => (
            coop_pass1_source(t, opts.count_io),
            coop_pass2_source(t, opts.count_io),
            format!("coop1:{t:?}"),
            format!("coop2:{t:?}"),
        ),
        None => (
            pass1_source(&plan.pass1, opts.count_io),
            pass2_source(&plan.pass2, opts.count_io),
            format!("pass1:{:?}", plan.pass1),
            format!("pass2:{:?}", plan.pass2),
        ),
    };
    let p1 = gpu.pipeline(
        &format!("{key1}:{}:{}", opts.count_io, opts.trusted),
        &src1,
        opts.trusted,
    )?;
    let red = gpu.pipeline(
        &format!("reduce:{}:{}", opts.count_io, opts.trusted),
        &reduce_source(opts.count_io),
        opts.trusted,
    )?;
    let pack = match &coop {
        Some(t) => Some(gpu.pipeline(
            &format!("coop_pack:{t:?}:{}:{}", opts.count_io, opts.trusted),
            &coop_pack_source(t, opts.count_io),
            opts.trusted,
        )?),
        None => None,
    };
    let p2 = gpu.pipeline(
        &format!("{key2}:{}:{}", opts.count_io, opts.trusted),
        &src2,
        opts.trusted,
    )?;
    // The coop passes scale keys into [-1, 1] (queries by the inverse) and values into [0, 1].
    let k_scale = pre.k_max_norm.iter().copied().fold(0.0, f64::max);
    let k_scale = if k_scale > 0.0 && k_scale.is_finite() {
        k_scale as f32
    } else {
        1.0
    };
    // Per unit: vmin, then 1/range (pass 1) or range (pass 2) of each value column.
    let value_norm = |u0: usize, nu: usize, invert: bool| -> wgpu::Buffer {
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
        let buf = storage_buffer(gpu, out.len(), "value normalisation");
        gpu.queue.write_buffer(&buf, 0, bytemuck::cast_slice(&out));
        buf
    };
    let (l1, lr, l2) = (
        p1.get_bind_group_layout(0),
        red.get_bind_group_layout(0),
        p2.get_bind_group_layout(0),
    );

    let heads = p.query_heads();
    let mut out = vec![0f32; heads * p.l * p.ev];
    gpu.checked(|| {
        let idx_buf = storage_buffer(gpu, idx.len(), "feature indices");
        let w_buf = storage_buffer(gpu, weights.len(), "feature weights");
        gpu.queue
            .write_buffer(&idx_buf, 0, bytemuck::cast_slice(&idx));
        gpu.queue
            .write_buffer(&w_buf, 0, bytemuck::cast_slice(&weights));
        let sp_buf = storage_buffer(gpu, c.units * r * ev1, "S'");
        let partial_buf = storage_buffer(gpu, c.units * plan.splits * r * ev1, "partial S'");
        for u0 in (0..p.units).step_by(c.units) {
            let nu = c.units.min(p.units - u0);
            let mu_buf = storage_buffer(gpu, nu * p.e, "mu");
            let vn_bufs = coop.map(|_| (value_norm(u0, nu, true), value_norm(u0, nu, false)));
            gpu.queue.write_buffer(
                &mu_buf,
                0,
                bytemuck::cast_slice(&pre.mu[u0 * p.e..(u0 + nu) * p.e]),
            );
            // Pass 1 and the reduction, one key chunk at a time (S' is a sum over keys).
            for (ci, s0) in (0..p.s).step_by(c.kv_rows).enumerate() {
                let sc = c.kv_rows.min(p.s - s0);
                let kc = gather(k, u0, nu, p.s, s0, sc, p.e);
                let vc = gather(v, u0, nu, p.s, s0, sc, p.ev);
                let k_buf = uploads.buffer(gpu, kc, "k");
                let v_buf = uploads.buffer(gpu, vc, "v");
                let keys_per_split = plan.keys_per_split.min(sc);
                let splits = sc.div_ceil(keys_per_split);
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[
                        sc as u32,
                        keys_per_split as u32,
                        splits as u32,
                        (1.0 / k_scale).to_bits(),
                    ]),
                );
                let (bufs, chunks1) = match (&coop, &vn_bufs) {
                    (Some(t), Some((vn1, _))) => (
                        vec![&prm, &k_buf, &v_buf, &mu_buf, &idx_buf, vn1, &partial_buf],
                        t.chunks1(),
                    ),
                    _ => (
                        vec![&prm, &k_buf, &v_buf, &mu_buf, &idx_buf, &partial_buf],
                        plan.pass1.chunks(),
                    ),
                };
                let (counted, t) = dispatch_no_read(
                    gpu,
                    &p1,
                    &l1,
                    &bufs,
                    opts,
                    (splits as u32, chunks1 as u32, nu as u32),
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "pass1", counted, t));
                let words = r * ev1;
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[splits as u32, u32::from(ci > 0), words as u32, 0]),
                );
                let (counted, t) = dispatch_no_read(
                    gpu,
                    &red,
                    &lr,
                    &[&prm, &partial_buf, &sp_buf],
                    opts,
                    (words.div_ceil(AUX_THREADS) as u32, nu as u32, 1),
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "reduce", counted, t));
            }
            // Coop pass 2 reads S'' = S' / keys in f16 and the normaliser column z.
            let (s16_buf, z_buf) = match (&coop, &pack) {
                (Some(t), Some(pack)) => {
                    let s16 = storage_buffer(gpu, (nu * t.rp() * t.padded_ev()).div_ceil(2), "S''");
                    let z = storage_buffer(gpu, nu * t.rp(), "z");
                    let inv_keys = 1.0 / p.s as f32;
                    let prm = uniform_buffer(gpu, bytemuck::cast_slice(&[inv_keys, 0.0, 0.0, 0.0]));
                    let (counted, t_s) = dispatch_no_read(
                        gpu,
                        pack,
                        &pack.get_bind_group_layout(0),
                        &[&prm, &sp_buf, &s16, &z],
                        opts,
                        (
                            (t.rp() * t.padded_ev()).div_ceil(AUX_THREADS) as u32,
                            nu as u32,
                            1,
                        ),
                    )?;
                    stats.absorb(&RunStats::dispatch(gpu, "pack", counted, t_s));
                    (Some(s16), Some(z))
                }
                _ => (None, None),
            };
            // Pass 2, one query chunk at a time.
            for l0 in (0..p.l).step_by(c.q_rows) {
                let lc = c.q_rows.min(p.l - l0);
                let qh = nu * p.group;
                let qc = gather(q, u0 * p.group, qh, p.l, l0, lc, p.e);
                let q_buf = uploads.buffer(gpu, qc, "q");
                let o_words = qh * lc * p.ev;
                let o_buf = storage_buffer(gpu, o_words, "o");
                let (b, chunks2) = match &coop {
                    Some(t) => (t.b2(), t.chunks2()),
                    None => (plan.pass2.b, plan.pass2.chunks()),
                };
                let blocks = lc.div_ceil(b);
                let wgs = plan.pass2_workgroups.min(blocks);
                let prm = uniform_buffer(
                    gpu,
                    bytemuck::cast_slice(&[
                        lc as u32,
                        blocks as u32,
                        p.group as u32,
                        chunks2 as u32,
                        k_scale.to_bits(),
                        (p.s as f32).to_bits(),
                        0,
                        0,
                    ]),
                );
                let bufs = match (&s16_buf, &z_buf, &vn_bufs) {
                    (Some(s16), Some(z), Some((_, vn2))) => {
                        vec![&prm, &q_buf, s16, z, &idx_buf, &w_buf, vn2, &o_buf]
                    }
                    _ => vec![&prm, &q_buf, &sp_buf, &idx_buf, &w_buf, &o_buf],
                };
                let (oc, (counted, t)) = dispatch_one(
                    gpu,
                    &p2,
                    &l2,
                    &bufs,
                    opts,
                    (wgs as u32, qh as u32, 1),
                    &o_buf,
                    o_words,
                )?;
                stats.absorb(&RunStats::dispatch(gpu, "pass2", counted, t));
                if oc.len() == out.len() {
                    // One dispatch for the whole output: it is already in place.
                    out = oc;
                    continue;
                }
                for h in 0..qh {
                    for row in 0..lc {
                        let dst = ((u0 * p.group + h) * p.l + l0 + row) * p.ev;
                        out[dst..dst + p.ev]
                            .copy_from_slice(&oc[(h * lc + row) * p.ev..(h * lc + row + 1) * p.ev]);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}
