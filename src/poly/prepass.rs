//! The pre-pass of the poly method: key mean, query and centred key norms (beta), value ranges and
//! non-finite counts, on the GPU; its tile plan.

use super::plan::{AUX_THREADS, POLY_THREADS, TARGET_WORKGROUPS};
use crate::api::Problem;
use crate::budget::cdiv;
use crate::budget::Budget;
use crate::chunking::Chunking;
use crate::device::Gpu;
use crate::error::Error;
use crate::launch::{Launch, RunOptions, RunStats};
use crate::transfer::{gather, storage_buffer, timed, HostStage, Uploads};
use crate::wgsl::{fill_template, io_counter_slots};

pub(crate) const PREPASS: &str = include_str!("../../shaders/prepass.wgsl");

/// Parameters of the pre-pass (`shaders/prepass.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PrepassParams {
    /// Rows per unit.
    pub rows: u32,
    /// Rows per workgroup.
    pub rows_per_block: u32,
    /// Blocks per unit.
    pub blocks: u32,
    /// 1: subtract mu[unit] before the norms (key centring).
    pub use_mu: u32,
}

pub fn prepass_source(width: usize, tile_rows: usize, count_io: bool) -> String {
    let [decl, add] = io_counter_slots(count_io, 4);
    fill_template(
        PREPASS,
        &[
            ("W", width.to_string()),
            ("TR", tile_rows.to_string()),
            ("WG", AUX_THREADS.to_string()),
            ("TILE", (tile_rows * (width + 1)).to_string()),
            decl,
            add,
        ],
    )
}

/// Rows per pre-pass workgroup: a whole number of tiles, enough workgroups to fill the GPU.
pub fn prepass_rows_per_block(rows: usize, units: usize, width: usize, budget: &Budget) -> usize {
    let tile_rows = prepass_tile_rows(width, budget.fast_memory_words);
    let want_blocks = TARGET_WORKGROUPS.div_ceil(units.max(1)).max(1);
    let mut tiles = rows.div_ceil(want_blocks).div_ceil(tile_rows).max(1);
    while tiles > 1 && prepass_loop_iterations(width, tile_rows, tiles) > budget.max_loop_iterations
    {
        tiles /= 2;
    }
    tiles * tile_rows
}

/// Row lanes of the pre-pass: threads that share a column, each over its own rows.
pub fn prepass_row_lanes(width: usize) -> usize {
    POLY_THREADS / width.clamp(1, POLY_THREADS)
}

/// Loop iterations of one pre-pass invocation over `tiles` tiles (see prepass.wgsl).
pub fn prepass_loop_iterations(width: usize, tile_rows: usize, tiles: usize) -> u64 {
    let wg = POLY_THREADS;
    let rl = prepass_row_lanes(width);
    let cl = width.clamp(1, wg);
    let per_tile = 1
        + cdiv(tile_rows * width, wg)
        + cdiv(width, cl) * (1 + cdiv(tile_rows, rl))
        + cdiv(tile_rows, wg) * (1 + cdiv(width, 2));
    // Saturating: huge row counts (io_cost at any size) only compare it against the budget.
    (cdiv(rl * width, wg) + cdiv(width, wg) * (2 + rl as u64))
        .saturating_add((tiles as u64).saturating_mul(per_tile))
}

/// Most rows of a pre-pass tile: small tiles leave room for more workgroups per core, which hide
/// the load latency of this streaming kernel.
const PREPASS_MAX_TILE_ROWS: usize = 32;

/// Tile rows of the pre-pass for this width and fast memory.
pub fn prepass_tile_rows(width: usize, fast_memory_words: u64) -> usize {
    let fixed = prepass_fast_memory_words(width, 0) as usize;
    ((fast_memory_words as usize).saturating_sub(fixed) / (width + 1))
        .clamp(1, PREPASS_MAX_TILE_ROWS)
}

/// Workgroup memory of the pre-pass: the tile (rows padded by a word), the partial column
/// sums/min/max of every row lane, mu, and two atomics.
pub fn prepass_fast_memory_words(width: usize, tile_rows: usize) -> u64 {
    (tile_rows * (width + 1) + 3 * prepass_row_lanes(width) * width + width + 2) as u64
}

/// Statistics of a `(units, rows, width)` array, reduced over all rows of each unit.
#[derive(Clone, Debug, PartialEq)]
pub struct RowStats {
    pub col_sum: Vec<f64>,
    pub col_min: Vec<f64>,
    pub col_max: Vec<f64>,
    pub max_norm2: f64,
    pub nonfinite: u64,
}

impl RowStats {
    fn new(width: usize) -> RowStats {
        RowStats {
            col_sum: vec![0.0; width],
            col_min: vec![f64::INFINITY; width],
            col_max: vec![f64::NEG_INFINITY; width],
            max_norm2: 0.0,
            nonfinite: 0,
        }
    }

    fn absorb(&mut self, block: &[f32], width: usize) {
        for c in 0..width {
            self.col_sum[c] += f64::from(block[c]);
            self.col_min[c] = self.col_min[c].min(f64::from(block[width + c]));
            self.col_max[c] = self.col_max[c].max(f64::from(block[2 * width + c]));
        }
        let n2 = f64::from(block[3 * width]);
        self.max_norm2 = if n2.is_nan() {
            f64::INFINITY
        } else {
            self.max_norm2.max(n2)
        };
        self.nonfinite += block[3 * width + 1] as u64;
    }
}

#[derive(Clone, Copy)]
pub(crate) struct PrepassShape {
    pub units: usize,
    pub rows: usize,
    pub width: usize,
    pub units_per_dispatch: usize,
    pub rows_per_dispatch: usize,
}

/// Runs the pre-pass over `x` (optionally centred on `mu`, `(units, width)`), one RowStats per unit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_stats(
    gpu: &Gpu,
    x: &[f32],
    mu: Option<&[f32]>,
    sh: PrepassShape,
    budget: &Budget,
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Vec<RowStats>, Error> {
    let w = sh.width;
    let tile_rows = prepass_tile_rows(w, budget.fast_memory_words);
    let key = format!("prepass:{w}:{tile_rows}:{}:{}", opts.count_io, opts.trusted);
    let pipeline = gpu.pipeline(
        &key,
        &prepass_source(w, tile_rows, opts.count_io),
        opts.trusted,
    )?;
    let mut result = vec![RowStats::new(w); sh.units];
    for u0 in (0..sh.units).step_by(sh.units_per_dispatch) {
        let nu = sh.units_per_dispatch.min(sh.units - u0);
        for r0 in (0..sh.rows).step_by(sh.rows_per_dispatch) {
            let nr = sh.rows_per_dispatch.min(sh.rows - r0);
            let rows_per_block = prepass_rows_per_block(nr, nu, w, budget);
            let blocks = nr.div_ceil(rows_per_block);
            let xc = gather(x, u0, nu, sh.rows, r0, nr, w);
            let mu_c: Vec<f32> = match mu {
                Some(m) => m[u0 * w..(u0 + nu) * w].to_vec(),
                None => vec![0.0; nu * w],
            };
            let out_words = nu * blocks * (3 * w + 2);
            let params = PrepassParams {
                rows: nr as u32,
                rows_per_block: rows_per_block as u32,
                blocks: blocks as u32,
                use_mu: u32::from(mu.is_some()),
            };
            let (blocks_out, st) = gpu.checked(|| {
                let x_buf = uploads.buffer(gpu, xc, "prepass x");
                let mu_buf = storage_buffer(gpu, mu_c.len(), "prepass mu");
                let out_buf = storage_buffer(gpu, out_words, "prepass out");
                gpu.queue
                    .write_buffer(&mu_buf, 0, bytemuck::cast_slice(&mu_c));
                Launch {
                    pass: "prepass",
                    pipeline: &pipeline,
                    params: &params,
                    buffers: &[&*x_buf, &mu_buf, &out_buf],
                    grid: (blocks as u32, nu as u32, 1),
                }
                .run(gpu, opts, &[(&out_buf, out_words)])
            })?;
            stats.absorb(&st);
            for u in 0..nu {
                for b in 0..blocks {
                    let o = (u * blocks + b) * (3 * w + 2);
                    result[u0 + u].absorb(&blocks_out[o..o + 3 * w + 2], w);
                }
            }
        }
    }
    Ok(result)
}

/// What the pre-pass found, per KV unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepass {
    /// Key mean per unit, `(units, e)`.
    pub mu: Vec<f32>,
    /// max_i ||q_i|| over the unit's query heads.
    pub q_max_norm: Vec<f64>,
    /// max_j ||k_j - mu||.
    pub k_max_norm: Vec<f64>,
    /// Value column min and max, `(units, ev)`.
    pub v_min: Vec<f64>,
    pub v_max: Vec<f64>,
    /// Non-finite entries in query, key, value.
    pub nonfinite: [u64; 3],
}

impl Prepass {
    /// beta = scale * max||q|| * max||k - mu||, the largest over all units.
    pub fn beta(&self, scale: f32) -> f64 {
        self.q_max_norm
            .iter()
            .zip(&self.k_max_norm)
            .map(|(q, k)| f64::from(scale.abs()) * q * k)
            .fold(0.0, f64::max)
    }
}

/// [`RowStats`] of every unit of a `(units, rows, width)` array, on the host in float64 (centred
/// on `mu`, `(units, width)`, for the norms where given), on several threads for large arrays.
pub(crate) fn host_row_stats(
    x: &[f32],
    (units, rows, width): (usize, usize, usize),
    mu: Option<&[f32]>,
) -> Vec<RowStats> {
    let threads = crate::transfer::copy_threads(std::mem::size_of_val(x));
    (0..units)
        .map(|u| {
            let xu = &x[u * rows * width..(u + 1) * rows * width];
            let mu = mu.map(|m| &m[u * width..(u + 1) * width]);
            let per = rows.div_ceil(threads).max(1) * width.max(1);
            let mut all = RowStats::new(width);
            if threads == 1 {
                all.merge(&rows_of(xu, width, mu));
            } else {
                std::thread::scope(|scope| {
                    let parts: Vec<_> = xu
                        .chunks(per)
                        .map(|part| scope.spawn(move || rows_of(part, width, mu)))
                        .collect();
                    for h in parts {
                        match h.join() {
                            Ok(st) => all.merge(&st),
                            Err(e) => std::panic::resume_unwind(e),
                        }
                    }
                });
            }
            all
        })
        .collect()
}

/// [`host_row_stats`] of consecutive rows of one unit.
fn rows_of(x: &[f32], width: usize, mu: Option<&[f32]>) -> RowStats {
    let mut st = RowStats::new(width);
    for row in x.chunks(width.max(1)) {
        let mut norm2 = 0f64;
        for (c, &y) in row.iter().enumerate() {
            let y = f64::from(y);
            st.nonfinite += u64::from(!y.is_finite());
            st.col_sum[c] += y;
            st.col_min[c] = st.col_min[c].min(y);
            st.col_max[c] = st.col_max[c].max(y);
            let d = y - mu.map_or(0.0, |m| f64::from(m[c]));
            norm2 += d * d;
        }
        st.max_norm2 = if norm2.is_nan() {
            f64::INFINITY
        } else {
            st.max_norm2.max(norm2)
        };
    }
    st
}

impl RowStats {
    fn merge(&mut self, o: &RowStats) {
        for c in 0..self.col_sum.len() {
            self.col_sum[c] += o.col_sum[c];
            self.col_min[c] = self.col_min[c].min(o.col_min[c]);
            self.col_max[c] = self.col_max[c].max(o.col_max[c]);
        }
        self.max_norm2 = self.max_norm2.max(o.max_norm2);
        self.nonfinite += o.nonfinite;
    }
}

/// The pre-pass: Q and V once, K twice (its mean first, then the norms around it). Where the
/// call streams (nothing stays on the device), or its slices are not whole rows (not kept for
/// the passes), it runs on the host, in float64: the inputs then cross the bus once, for the
/// passes only.
#[allow(clippy::too_many_arguments)]
pub fn prepass(
    gpu: &Gpu,
    p: &Problem,
    plan_chunk: &Chunking,
    (q, k, v): (&[f32], &[f32], &[f32]),
    budget: &Budget,
    opts: &RunOptions,
    uploads: &Uploads,
    stats: &mut RunStats,
) -> Result<Prepass, Error> {
    let kv_shape = |width| PrepassShape {
        units: p.units,
        rows: p.s,
        width,
        units_per_dispatch: plan_chunk.units,
        rows_per_dispatch: plan_chunk.kv_rows,
    };
    let q_shape = PrepassShape {
        units: p.units * p.group,
        rows: p.l,
        width: p.e,
        units_per_dispatch: plan_chunk.units * p.group,
        rows_per_dispatch: plan_chunk.q_rows,
    };
    // On the device only where its uploads stay there for the passes (whole rows, kept).
    let host = uploads.streams() || plan_chunk.kv_rows < p.s || plan_chunk.q_rows < p.l;
    let stats_of = |x: &[f32], mu: Option<&[f32]>, sh: PrepassShape, stats: &mut RunStats| {
        if host {
            let dims = (sh.units, sh.rows, sh.width);
            return Ok(timed(gpu, HostStage::Compute, || {
                host_row_stats(x, dims, mu)
            }));
        }
        row_stats(gpu, x, mu, sh, budget, opts, uploads, stats)
    };
    let ks = stats_of(k, None, kv_shape(p.e), stats)?;
    let mu: Vec<f32> = ks
        .iter()
        .flat_map(|s| s.col_sum.iter().map(|x| (x / p.s as f64) as f32))
        .collect();
    let kc = stats_of(k, Some(&mu), kv_shape(p.e), stats)?;
    let vs = stats_of(v, None, kv_shape(p.ev), stats)?;
    let qs = if p.l > 0 {
        stats_of(q, None, q_shape, stats)?
    } else {
        vec![RowStats::new(p.e); p.units * p.group]
    };
    let q_max_norm = (0..p.units)
        .map(|u| {
            qs[u * p.group..(u + 1) * p.group]
                .iter()
                .map(|s| s.max_norm2.sqrt())
                .fold(0.0, f64::max)
        })
        .collect();
    Ok(Prepass {
        mu,
        q_max_norm,
        k_max_norm: kc.iter().map(|s| s.max_norm2.sqrt()).collect(),
        v_min: vs.iter().flat_map(|s| s.col_min.clone()).collect(),
        v_max: vs.iter().flat_map(|s| s.col_max.clone()).collect(),
        nonfinite: [
            qs.iter().map(|s| s.nonfinite).sum(),
            ks.iter().map(|s| s.nonfinite).sum(),
            vs.iter().map(|s| s.nonfinite).sum(),
        ],
    })
}
