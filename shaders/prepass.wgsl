// Pre-pass of the poly method: one read of a (units, rows, W) array per call, giving per workgroup
// block the column sums, column min/max, the largest squared row norm of x - mu, and the number of
// non-finite entries. The host reduces the blocks: key mean, beta, value ranges, finiteness.

struct Params {
    rows: u32,           // rows per unit
    rows_per_block: u32, // rows per workgroup
    blocks: u32,         // blocks per unit
    use_mu: u32,         // subtract mu[unit] before the norms (key centring)
}

const W: u32 = {{W}}u;
const TR: u32 = {{TR}}u; // rows per tile in workgroup memory
const WG: u32 = {{WG}}u;
const OUT: u32 = 3u * W + 2u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mu: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
{{IO_COUNTER_DECL}}

var<workgroup> tile: array<f32, {{TILE}}>;
var<workgroup> col_sum: array<f32, W>;
var<workgroup> col_min: array<f32, W>;
var<workgroup> col_max: array<f32, W>;
var<workgroup> mu_t: array<f32, W>;
var<workgroup> max_norm2: atomic<u32>;
var<workgroup> bad: atomic<u32>;

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let unit = wid.y;
    let r_begin = wid.x * params.rows_per_block;
    let r_end = min(params.rows, r_begin + params.rows_per_block);
    var words_read = 0u;
    var words_written = 0u;
    for (var c = lid; c < W; c += WG) {
        col_sum[c] = 0.0;
        col_min[c] = 3.4028235e38;
        col_max[c] = -3.4028235e38;
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
            tile[i] = val;
        }
        workgroupBarrier();
        for (var c = lid; c < W; c += WG) {
            var s = col_sum[c];
            var lo = col_min[c];
            var hi = col_max[c];
            for (var r = 0u; r < rows; r++) {
                let val = tile[r * W + c];
                s += val;
                lo = min(lo, val);
                hi = max(hi, val);
            }
            col_sum[c] = s;
            col_min[c] = lo;
            col_max[c] = hi;
        }
        for (var r = lid; r < rows; r += WG) {
            var n2 = 0.0;
            for (var c = 0u; c < W; c++) {
                let d = tile[r * W + c] - mu_t[c];
                n2 = fma(d, d, n2);
            }
            my_norm2 = max(my_norm2, n2);
        }
        workgroupBarrier();
    }
    // Non-negative floats order like their bit patterns; a NaN norm sorts above every number.
    atomicMax(&max_norm2, bitcast<u32>(select(3.4028235e38, my_norm2, my_norm2 == my_norm2)));
    atomicAdd(&bad, my_bad);
    workgroupBarrier();
    let o = (unit * params.blocks + wid.x) * OUT;
    for (var c = lid; c < W; c += WG) {
        out[o + c] = col_sum[c];
        out[o + W + c] = col_min[c];
        out[o + 2u * W + c] = col_max[c];
        words_written += 3u;
    }
    if (lid == 0u) {
        out[o + 3u * W] = bitcast<f32>(atomicLoad(&max_norm2));
        out[o + 3u * W + 1u] = f32(atomicLoad(&bad));
        words_written += 2u;
    }
{{IO_COUNTER_ADD}}
}
