// Pre-pass of the poly method: one read of a (units, rows, W) array per call, giving per workgroup
// block the column sums, column min/max, the largest squared row norm of x - mu, and the number of
// non-finite entries. The host reduces the blocks: key mean, beta, value ranges, finiteness.
// Every thread works on every tile: thread (rl, c0) keeps the partial statistics of columns
// c0, c0 + CL, ... over rows rl, rl + RL, ... of the tile; each row's norm is one thread's sum.

struct Params {
    rows: u32,           // rows per unit
    rows_per_block: u32, // rows per workgroup
    blocks: u32,         // blocks per unit
    use_mu: u32,         // subtract mu[unit] before the norms (key centring)
}

const W: u32 = 64u;
const TR: u32 = 32u; // rows per tile in workgroup memory
const WG: u32 = 128u;
const TS: u32 = W + 1u;  // tile row stride: a column's rows fall into different memory banks
const CL: u32 = min(W, WG); // column lanes
const RL: u32 = WG / CL;    // row lanes
const OUT: u32 = 3u * W + 2u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mu: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;


var<workgroup> tile: array<f32, 2080>;
// Partial column statistics, [rl * W + c]: each entry belongs to one thread until the end.
var<workgroup> p_sum: array<f32, RL * W>;
var<workgroup> p_min: array<f32, RL * W>;
var<workgroup> p_max: array<f32, RL * W>;
var<workgroup> mu_t: array<f32, W>;
var<workgroup> max_norm2: atomic<u32>;
var<workgroup> bad: atomic<u32>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let unit = wid.y;
    let r_begin = wid.x * params.rows_per_block;
    let r_end = min(params.rows, r_begin + params.rows_per_block);
    let c0 = lid % CL;
    let rl = lid / CL;
    var words_read = 0u;
    var words_written = 0u;
    for (var i = lid; i < RL * W; i += WG) {
        p_sum[i] = 0.0;
        p_min[i] = 3.4028235e38;
        p_max[i] = -3.4028235e38;
    }
    for (var c = lid; c < W; c += WG) {
        var m = 0.0;
        if (params.use_mu != 0u) {
            m = mu[unit * W + c];
            words_read += 1u;
        }
        mu_t[c] = m;
    }
    if (lid == 0u) {
        atomicStore(&max_norm2, 0u);
        atomicStore(&bad, 0u);
    }
    var my_bad = 0u;
    var my_norm2 = 0.0;
    workgroupBarrier();
    for (var t0 = r_begin; t0 < r_end; t0 += TR) {
        let rows = min(TR, r_end - t0);
        let base = (unit * params.rows + t0) * W;
        for (var i = lid; i < rows * W; i += WG) {
            let val = x[base + i];
            words_read += 1u;
            if (!(abs(val) <= 3.4028235e38)) {
                my_bad += 1u;
            }
            tile[(i / W) * TS + i % W] = val;
        }
        workgroupBarrier();
        if (rl < RL) {
            for (var c = c0; c < W; c += CL) {
                var s = p_sum[rl * W + c];
                var lo = p_min[rl * W + c];
                var hi = p_max[rl * W + c];
                for (var r = rl; r < rows; r += RL) {
                    let val = tile[r * TS + c];
                    s += val;
                    lo = min(lo, val);
                    hi = max(hi, val);
                }
                p_sum[rl * W + c] = s;
                p_min[rl * W + c] = lo;
                p_max[rl * W + c] = hi;
            }
        }
        for (var r = lid; r < rows; r += WG) {
            // Two accumulators halve the dependent chain.
            var n2a = 0.0;
            var n2b = 0.0;
            var c = 0u;
            for (; c + 1u < W; c += 2u) {
                let da = tile[r * TS + c] - mu_t[c];
                let db = tile[r * TS + c + 1u] - mu_t[c + 1u];
                n2a = fma(da, da, n2a);
                n2b = fma(db, db, n2b);
            }
            if (c < W) {
                let da = tile[r * TS + c] - mu_t[c];
                n2a = fma(da, da, n2a);
            }
            my_norm2 = max(my_norm2, n2a + n2b);
        }
        workgroupBarrier();
    }
    // Non-negative floats order like their bit patterns; a NaN norm sorts above every number.
    atomicMax(&max_norm2, bitcast<u32>(select(3.4028235e38, my_norm2, my_norm2 == my_norm2)));
    atomicAdd(&bad, my_bad);
    workgroupBarrier();
    let o = (unit * params.blocks + wid.x) * OUT;
    for (var c = lid; c < W; c += WG) {
        var s = 0.0;
        var lo = 3.4028235e38;
        var hi = -3.4028235e38;
        for (var r = 0u; r < RL; r++) {
            s += p_sum[r * W + c];
            lo = min(lo, p_min[r * W + c]);
            hi = max(hi, p_max[r * W + c]);
        }
        out[o + c] = s;
        out[o + W + c] = lo;
        out[o + 2u * W + c] = hi;
        words_written += 3u;
    }
    if (lid == 0u) {
        out[o + 3u * W] = bitcast<f32>(atomicLoad(&max_norm2));
        out[o + 3u * W + 1u] = f32(atomicLoad(&bad));
        words_written += 2u;
    }

}
