// Causal poly, the masked block inside a chunk: for a block of BQ query rows of one chunk, the
// unnormalised sums over the keys j <= i of that same chunk,
//     num_i = sum_j P(x_ij) v_j,  D_i = sum_j P(x_ij),  x_ij = scale q_i . (k_j - mu),
// P the fitted polynomial (coefficients c_0..c_G, Horner), written as [num | D] (Ev + 1 words per
// row) for pass 2 to add to the prefix state's contribution. The query block and a tile of BK
// keys (centred), rows padded with zeros to E4 vec4, the tile's values with a ones column (EV4
// vec4 per row), and the BQ x BK weight tile live in workgroup memory; thread lid accumulates the
// vec4 outputs lid + WG * a (row (lid + WG a) / EV4, columns 4 (the remainder) + 0..3) in named
// registers (`src/kernels/poly_causal.rs` unrolls them).

struct Params {
    l: u32,      // query rows per head in this dispatch (one window)
    s: u32,      // key rows per unit in this dispatch (the window's visible keys)
    group: u32,  // query heads per KV head
    chunk: u32,  // rows per chunk (a multiple of BQ)
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const E: u32 = {{E}}u;
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const E4: u32 = {{E4}}u;    // vec4 per key / query row (E padded with zeros)
const EV4: u32 = {{EV4}}u;  // vec4 per value row with its ones column
const BQ: u32 = {{BQ}}u;
const BK: u32 = {{BK}}u;
const G: u32 = {{G}}u;      // degree: G + 1 coefficients
const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> mu: array<f32>;
@group(0) @binding(5) var<storage, read> coeffs: array<f32>;
@group(0) @binding(6) var<storage, read_write> diag: array<f32>;{{GATE_DECL}}
{{IO_COUNTER_DECL}}

var<workgroup> q_t: array<vec4<f32>, {{Q_TILE}}>;
var<workgroup> k_t: array<vec4<f32>, {{K_TILE}}>;
var<workgroup> v_t: array<vec4<f32>, {{V_TILE}}>;
var<workgroup> p_t: array<f32, {{P_TILE}}>;
var<workgroup> mu_t: array<f32, E>;
var<workgroup> c_t: array<f32, {{C_TILE}}>;{{GATE_TILES}}

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let unit = head / params.group;
    let q0 = wid.x * BQ;
    let rows = min(BQ, params.l - q0);
    // Keys c0 .. j_end - 1 of the block's chunk; key j is visible to row i when j <= i.
    let c0 = (q0 / params.chunk) * params.chunk;
    let j_end = min(q0 + rows, params.s);
    var words_read = 0u;
    var words_written = 0u;

    for (var i = lid; i < E; i += WG) {
        mu_t[i] = mu[unit * E + i];
        words_read += 1u;
    }
    for (var i = lid; i <= G; i += WG) {
        c_t[i] = coeffs[i];
        words_read += 1u;
    }
    for (var i = lid; i < BQ * E4 * 4u; i += WG) {
        let r = i / (E4 * 4u);
        let c = i % (E4 * 4u);
        var x = 0.0;
        if (r < rows && c < E) {
            x = q[(head * params.l + q0 + r) * E + c];
            words_read += 1u;
        }
        q_t[r * E4 + c / 4u][c % 4u] = x;
    }
{{GATE_Q_LOAD}}{{ACC_DECL}}
    for (var j0 = c0; j0 < j_end; j0 += BK) {
        let kr = min(BK, j_end - j0);
        workgroupBarrier();
        for (var i = lid; i < BK * E4 * 4u; i += WG) {
            let j = i / (E4 * 4u);
            let c = i % (E4 * 4u);
            var x = 0.0;
            if (j < kr && c < E) {
                x = k[(unit * params.s + j0 + j) * E + c] - mu_t[c];
                words_read += 1u;
            }
            k_t[j * E4 + c / 4u][c % 4u] = x;{{GATE_K_LOAD}}
        }
        for (var i = lid; i < BK * EV4 * 4u; i += WG) {
            let j = i / (EV4 * 4u);
            let c = i % (EV4 * 4u);
            var x = 0.0;
            if (j < kr) {
                if (c < EV) {
                    x = v[(unit * params.s + j0 + j) * EV + c];
                    words_read += 1u;
                } else if (c == EV) {
                    x = 1.0;
                }
            }
            v_t[j * EV4 + c / 4u][c % 4u] = x;
        }
        workgroupBarrier();
        for (var i = lid; i < BQ * BK; i += WG) {
            let r = i / BK;
            let j = i % BK;
            var x4 = vec4<f32>();
            for (var c = 0u; c < E4; c++) {
                x4 = fma(q_t[r * E4 + c], k_t[j * E4 + c], x4);
            }
            let x = (x4.x + x4.y + x4.z + x4.w) * params.scale;
{{HORNER}}
            // Hidden keys (j > i), padding keys and padding rows weigh nothing.
            if (r >= rows || j >= kr || j0 + j > q0 + r) {
                p = 0.0;
            }
            p_t[i] = p;
        }
        workgroupBarrier();
        for (var j = 0u; j < kr; j++) {
{{ACCUMULATE}}
        }
    }
{{STORE}}
{{IO_COUNTER_ADD}}
}
