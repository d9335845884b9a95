//! The host loop of the exact kernel: cuts the problem into dispatches and merges split-KV partial
//! results.

use super::kernel::{shader_source, Params};
use super::plan::ExactPlan;
use crate::api::Problem;
use crate::chunking::chunks;
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{RunOptions, RunStats, Timer};
use crate::transfer::{
    assign_parallel, gather, read_mapped, readback_buffer, storage_buffer, uniform_buffer, upload,
    PooledReadback,
};

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
    let t = &plan.tiles;
    let c = &plan.chunking;
    let key = format!("exact:{t:?}:{}:{}", opts.count_io, opts.trusted);
    let pipeline = gpu.pipeline(&key, &shader_source(t, opts.count_io), opts.trusted)?;
    let layout = pipeline.get_bind_group_layout(0);

    let split_kv = c.kv_rows < p.s;
    let max_q_words = c.units * p.group * c.q_rows * p.e;
    let max_o_words = c.units * p.group * c.q_rows * p.ev;
    let q_buf = storage_buffer(gpu, max_q_words, "q");
    let k_buf = storage_buffer(gpu, c.units * c.kv_rows * p.e, "k");
    let v_buf = storage_buffer(gpu, c.units * c.kv_rows * p.ev, "v");
    let o_buf = storage_buffer(gpu, max_o_words, "o");
    let stats_words = if split_kv {
        c.units * p.group * c.q_rows * 2
    } else {
        1
    };
    let stats_buf = storage_buffer(gpu, stats_words, "stats");
    let counter = opts.count_io.then(|| storage_buffer(gpu, 2, "io_words"));
    let o_read = PooledReadback::new(gpu, ((max_o_words + stats_words) * 4) as u64);
    let counter_read = counter.as_ref().map(|_| readback_buffer(gpu, 8));
    let timer = Timer::new(gpu);

    let heads = p.query_heads();
    let mut out = vec![0f32; heads * p.l * p.ev];
    // Running softmax statistics (log2 domain) of the merged split-KV chunks, per output row.
    let mut run_m = if split_kv {
        vec![f64::NEG_INFINITY; heads * p.l]
    } else {
        vec![]
    };
    let mut run_l = if split_kv {
        vec![0f64; heads * p.l]
    } else {
        vec![]
    };
    let mut stats = RunStats::default();

    for ch in chunks(p, c) {
        let qh0 = ch.unit0 * p.group;
        let qh = ch.units * p.group;
        let qc = gather(q, qh0, qh, p.l, ch.l0, ch.lc, p.e);
        let kc = gather(k, ch.unit0, ch.units, p.s, ch.s0, ch.sc, p.e);
        let vc = gather(v, ch.unit0, ch.units, p.s, ch.s0, ch.sc, p.ev);
        let params = Params {
            l: ch.lc as u32,
            s: ch.sc as u32,
            group: p.group as u32,
            causal: u32::from(p.causal),
            q_offset: ch.l0 as u32,
            kv_offset: ch.s0 as u32,
            write_stats: u32::from(split_kv),
            scale_log2: p.scale * std::f32::consts::LOG2_E,
        };
        let o_words = qh * ch.lc * p.ev;
        let s_words = if split_kv { qh * ch.lc * 2 } else { 0 };
        let (o_chunk, st_chunk, counted, kernel_s) = gpu.checked(|| {
            let params_buf = uniform_buffer(gpu, bytemuck::bytes_of(&params));
            upload(gpu, &q_buf, bytemuck::cast_slice(&qc));
            upload(gpu, &k_buf, bytemuck::cast_slice(&kc));
            upload(gpu, &v_buf, bytemuck::cast_slice(&vc));
            let mut entries = vec![
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: q_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: k_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: v_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: o_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: stats_buf.as_entire_binding(),
                },
            ];
            if let Some(cb) = &counter {
                gpu.queue.write_buffer(cb, 0, &[0u8; 8]);
                entries.push(wgpu::BindGroupEntry {
                    binding: 6,
                    resource: cb.as_entire_binding(),
                });
            }
            let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("exact"),
                layout: &layout,
                entries: &entries,
            });
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass =
                    enc.begin_compute_pass(&timer.as_ref().map(Timer::pass).unwrap_or_default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(ch.lc.div_ceil(t.bq) as u32, qh as u32, 1);
            }
            if let Some(tm) = &timer {
                tm.stop(&mut enc);
            }
            enc.copy_buffer_to_buffer(&o_buf, 0, &o_read, 0, (o_words * 4) as u64);
            if split_kv {
                enc.copy_buffer_to_buffer(
                    &stats_buf,
                    0,
                    &o_read,
                    (o_words * 4) as u64,
                    (s_words * 4) as u64,
                );
            }
            if let (Some(cb), Some(cr)) = (&counter, &counter_read) {
                enc.copy_buffer_to_buffer(cb, 0, cr, 0, 8);
            }
            gpu.queue.submit([enc.finish()]);
            let (o_chunk, st_chunk) =
                read_mapped(gpu, &o_read, ((o_words + s_words) * 4) as u64, |b| {
                    let f: &[f32] = bytemuck::cast_slice(b);
                    let mut o = Vec::new();
                    assign_parallel(&mut o, &f[..o_words]);
                    (o, f[o_words..].to_vec())
                })?;
            let counted = match &counter_read {
                Some(cr) => Some(read_mapped(gpu, cr, 8, |b| {
                    let w: &[u32] = bytemuck::cast_slice(b);
                    (u64::from(w[0]), u64::from(w[1]))
                })?),
                None => None,
            };
            let kernel_s = match &timer {
                Some(tm) => Some(tm.seconds(gpu)?),
                None => None,
            };
            Ok((o_chunk, st_chunk, counted, kernel_s))
        })?;
        stats.absorb(&RunStats::dispatch(gpu, "exact", counted, kernel_s));
        if !split_kv && o_chunk.len() == out.len() {
            // One dispatch for the whole output: it is already in place.
            out = o_chunk;
            continue;
        }

        for h in 0..qh {
            for r in 0..ch.lc {
                let row = (qh0 + h) * p.l + ch.l0 + r;
                let src = &o_chunk[(h * ch.lc + r) * p.ev..(h * ch.lc + r + 1) * p.ev];
                let dst = &mut out[row * p.ev..(row + 1) * p.ev];
                if !split_kv {
                    dst.copy_from_slice(src);
                    continue;
                }
                let (m_c, l_c) = (
                    f64::from(st_chunk[(h * ch.lc + r) * 2]),
                    f64::from(st_chunk[(h * ch.lc + r) * 2 + 1]),
                );
                if l_c <= 0.0 {
                    continue;
                }
                let m_new = run_m[row].max(m_c);
                let w_old = run_l[row] * (run_m[row] - m_new).exp2();
                let w_new = l_c * (m_c - m_new).exp2();
                let total = w_old + w_new;
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = ((f64::from(*d) * w_old + f64::from(*s) * w_new) / total) as f32;
                }
                run_m[row] = m_new;
                run_l[row] = total;
            }
        }
    }
    Ok((out, stats))
}
