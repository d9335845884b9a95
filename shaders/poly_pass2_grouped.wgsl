// Poly pass 2 for degree <= 2 without feature tiles: O = D^-1 Phi_q(Q) S'. With x = [1, q_0, ..,
// q_{E-1}], the features in table order fall into groups of consecutive S' rows: group j (0..=E for
// degree 2, only 0 for degree 1) is x_j * x_c for c = j..E, rows j (E + 1) - j (j - 1) / 2 on (group
// 0: the constant and the linear features). So Phi_q(Q) S' = sum_j diag(X[:, j]) X[:, j..] W_j S'_j
// (W the feature weights): per group a product whose A operand is the query tile itself, the
// group's partial product T scaled by its column X[:, j] once the group is done. A workgroup keeps
// the block's X transposed in workgroup memory (`phi`, rows contiguous) and streams S' in chunks
// of at most RC rows of one group, weighted on their way into workgroup memory, the next chunk
// loaded into registers while this one is multiplied. Thread (tr, tc) keeps its rows of the
// output and of T (`micro_tile_row` in `src/kernels/poly.rs`) for value columns 4*(tc + TC*u) +
// 0..3 in named registers, and sums the normaliser D = Phi_q(Q) W z over the chunk rows tc, tc +
// TC, ... (z the last column of S'); the TC partials of a row are added at the end.

struct Params {
    l: u32,       // query rows per head in this dispatch
    blocks: u32,  // query blocks per head
    group: u32,   // query heads per KV head
    chunks: u32,  // S' chunks (see plan::grouped_chunks); a uniform so drivers do not unroll
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;
const XS: u32 = {{XS}}u;    // column stride of the transposed query tile (Pass2Tiles::grouped_stride)
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;
const B: u32 = {{B}}u;      // query rows per block (TR x rows per thread)
const TR: u32 = {{TR}}u;    // thread grid TR x TC
const TC: u32 = {{TC}}u;
const CW: u32 = {{CW}}u;    // vec4 per S' tile row: EV columns padded to whole thread columns
const WG: u32 = TR * TC;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s_prime: array<f32>;
@group(0) @binding(3) var<storage, read> feat_w: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
{{IO_COUNTER_DECL}}

// phi[c * XS + row] = X[row, c]; after the chunk loop, the normaliser partials (tc * XS + row).
var<workgroup> phi: array<{{PHI_ELEM}}, {{PHI}}>;
var<workgroup> s_tile: array<vec4<f32>, {{S_TILE}}>; // weighted value columns of the chunk
var<workgroup> w_t: array<f32, RC>;                  // weights of the chunk stored next
var<workgroup> z_t: array<f32, RC>;                  // weighted normaliser column of the chunk

fn phi_set(i: u32, x: f32) {
{{PHI_SET}}
}

fn phi_get(i: u32) -> f32 {
{{PHI_GET}}
}

// First S' row of group j.
fn group_start(j: u32) -> u32 {
    return j * E1 - j * (j - 1u) / 2u;
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
{{PREFETCH_DECL}}
    for (var qb = wid.x; qb < params.blocks; qb += nwg.x) {
        let q0 = qb * B;
        let rows = min(B, params.l - q0);
        // The previous block's normaliser partials are read before the tile is rewritten.
        workgroupBarrier();
        // Consecutive threads take consecutive rows of one column: no bank conflicts.
        for (var i = lid; i < B * E1; i += WG) {
            let r = i % B;
            let c = i / B;
            var x = 0.0;
            if (r < rows) {
                x = 1.0;
                if (c > 0u) {
                    x = q[(head * params.l + q0 + r) * E + c - 1u];
                    words_read += 1u;
                }
            }
            phi_set(c * XS + r, x);
        }
{{ACC_DECL}}
{{LOAD_FIRST}}
        var grp = 0u;
        var off = 0u;
        for (var ch = 0u; ch < params.chunks; ch++) {
            let glen = E1 - grp;
            let len = min(RC, glen - off);
            let col0 = grp + off;
            var next_grp = grp;
            var next_off = off + RC;
            if (next_off >= glen) {
                next_grp = grp + 1u;
                next_off = 0u;
            }
            workgroupBarrier();
{{CHUNK_STORE}}
            workgroupBarrier();
            if (ch + 1u < params.chunks) {
                let f0 = group_start(next_grp) + next_off;
                let rows_n = min(RC, E1 - next_grp - next_off);
{{LOAD_NEXT}}
            }
{{PRODUCT}}
            for (var f = tc; f < len; f += TC) {
{{NORMALISER}}
            }
            // The group is done: scale its partial product by its column of X.
            if (next_grp != grp) {
{{FOLD}}
            }
            // This chunk's weights were read before the second barrier.
            if (ch + 1u < params.chunks && lid < RC) {
                w_t[lid] = wx;
            }
            grp = next_grp;
            off = next_off;
        }
        workgroupBarrier();
{{D_STORE}}
        workgroupBarrier();
{{STORE}}
    }
{{IO_COUNTER_ADD}}
}
