// Poly pass 2: O = D^-1 Phi_q(Q) S'. A workgroup keeps a block of B query rows in workgroup
// memory and streams S' through in chunks of RC feature rows; with a single chunk (schedule A)
// S' is loaded once and the workgroup loops over many query blocks. Thread (tr, tc) keeps rows
// tr + TR*a and value columns 4*(tc + TC*u) + 0..3 of the block's output, and the normaliser D
// of its rows, in named registers across all chunks (`src/kernels/poly.rs` unrolls them).

struct Params {
    l: u32,       // query rows per head in this dispatch
    blocks: u32,  // query blocks per head
    group: u32,   // query heads per KV head
    chunks: u32,  // S' chunks; a uniform rather than a constant so drivers do not unroll the loop
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;
const RESIDENT: bool = {{RESIDENT}}; // one chunk: S' loaded once per workgroup
const B: u32 = {{B}}u;      // query rows per block (TR x rows per thread)
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;
const TR: u32 = {{TR}}u;    // thread grid TR x TC
const TC: u32 = {{TC}}u;
const CW: u32 = {{CW}}u;    // vec4 per S' tile row: EV columns padded to whole thread columns
const WG: u32 = TR * TC;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s_prime: array<f32>;
@group(0) @binding(3) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(4) var<storage, read> feat_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
{{IO_COUNTER_DECL}}

var<workgroup> q_tile: array<f32, {{Q_TILE}}>;
var<workgroup> s_tile: array<vec4<f32>, {{S_TILE}}>; // value columns of the chunk
var<workgroup> s_d: array<f32, RC>;                   // its normaliser column
var<workgroup> phi: array<f32, {{PHI}}>;              // phi[f * B + r]: a thread's rows are TR apart
var<workgroup> idx_t: array<u32, {{IDX}}>;
var<workgroup> w_t: array<f32, RC>;

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

// Loads feature rows f0.. of S' with their index words and weights; rows past R become zero.
fn load_chunk(unit: u32, f0: u32, lid: u32) -> u32 {
    var words = 0u;
    let rows_f = min(RC, R - f0);
    for (var i = lid; i < RC * EV1; i += WG) {
        let f = i / EV1;
        let c = i % EV1;
        var x = 0.0;
        if (f < rows_f) {
            x = s_prime[(unit * R + f0) * EV1 + i];
            words += 1u;
        }
        if (c < EV) {
            s_tile[f * CW + c / 4u][c % 4u] = x;
        } else {
            s_d[f] = x;
        }
    }
    for (var i = lid; i < RC * IW; i += WG) {
        var w = 0u;
        if (i / IW < rows_f) {
            w = feat_idx[f0 * IW + i];
            words += 1u;
        }
        idx_t[i] = w;
    }
    for (var i = lid; i < RC; i += WG) {
        var w = 0.0;
        if (i < rows_f) {
            w = feat_w[f0 + i];
            words += 1u;
        }
        w_t[i] = w;
    }
    return words;
}

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wid.y;
    let unit = head / params.group;
    let tr = lid / TC;
    let tc = lid % TC;
    var words_read = 0u;
    var words_written = 0u;
    // The padding columns of the S' tile are never loaded: zero them once.
    for (var i = lid; i < RC * CW; i += WG) {
        s_tile[i] = vec4<f32>();
    }
    workgroupBarrier();
    if (RESIDENT) {
        words_read += load_chunk(unit, 0u, lid);
    }
    for (var qb = wid.x; qb < params.blocks; qb += nwg.x) {
        let q0 = qb * B;
        let rows = min(B, params.l - q0);
        for (var i = lid; i < B * E1; i += WG) {
            let r = i / E1;
            let c = i % E1;
            var x = 1.0;
            if (c < E) {
                x = 0.0;
                if (r < rows) {
                    x = q[(head * params.l + q0 + r) * E + c];
                    words_read += 1u;
                }
            }
            q_tile[i] = x;
        }
{{ACC_DECL}}
        for (var ch = 0u; ch < params.chunks; ch++) {
            if (!RESIDENT) {
                workgroupBarrier();
                words_read += load_chunk(unit, ch * RC, lid);
            }
            workgroupBarrier();
            for (var i = lid; i < B * RC; i += WG) {
                let f = i / B;
                let r = i % B;
                var p = w_t[f];
                for (var t = 0u; t < G; t++) {
                    p *= q_tile[r * E1 + feature_index(f, t)];
                }
                phi[i] = p;
            }
            workgroupBarrier();
            // Feature rows past R are zero: the loop stops at the chunk's last real row.
            let rows_f = min(RC, R - ch * RC);
{{PRODUCT}}
        }
        // The outputs are in registers: the next block rewrites the tiles only after barriers.
{{STORE}}
    }
{{IO_COUNTER_ADD}}
}
