// Causal poly on cooperative matrices (tensor cores), the masked block inside a chunk: for a
// block of BQ query rows of one chunk, the unnormalised sums over the keys j <= i of that chunk,
//     num_i = sum_j P(x_ij) v_j,  D_i = sum_j P(x_ij),  x_ij = scale q_i . (k_j - mu),
// written as [num | D] (Ev + 1 words per row) for pass 2, as shaders/poly_causal_diag.wgsl does.
// X = Q' K'^T on 16 x 16 x 16 tiles with f16 operands and f32 accumulators, where
// Q' = q * scale * P2 and K' = (k - mu) / P2 (P2 a power of two at least the largest centred key
// norm: K' in [-1, 1], Q' K'^T = X); P(X) in f32 (Horner), masked, rounded to f16; then
// P [V' | 1] on tiles with V' = (v - vmin) / vrange in [0, 1], undone at the store:
// num = vmin D + vrange num'. Subgroup s owns the query rows 16 s + 0..15: its Q fragments stay in
// registers, its scores and weights go through its own slices of s_t and p_t; only the K/V tile is
// shared by the workgroup. `src/poly/causal_coop.rs` fills the slots and unrolls the tiles into
// named registers (and derives the f16 rounding bound).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    l: u32,           // query rows per head in this dispatch (one window)
    s: u32,           // key rows per unit in this dispatch (the window's visible keys)
    group: u32,       // query heads per KV head
    chunk: u32,       // rows per chunk (a multiple of BQ)
    q_scale: f32,     // scale * P2
    k_inv_scale: f32, // 1 / P2
    _pad0: u32,
    _pad1: u32,
}

const E: u32 = {{E}}u;
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const EP: u32 = {{EP}}u;    // E padded to whole 16-column tiles (zeros)
const EVP: u32 = {{EVP}}u;  // Ev + 1 (the ones column) padded to whole 16-column tiles
const BQ: u32 = {{BQ}}u;    // query rows per workgroup: 16 per subgroup
const BK: u32 = {{BK}}u;    // keys per tile, a multiple of 16
const G: u32 = {{G}}u;      // degree: G + 1 coefficients
const WG: u32 = {{WG}}u;
const SG: u32 = {{SG}}u;    // subgroup size (the adapter has exactly one)
// Row strides in workgroup memory: padded widths plus 8 halves (or 4 floats), so that every row
// starts on 16 bytes (NVIDIA returns garbage for cooperative loads from other addresses) and rows
// fall in different banks.
const KS: u32 = EP + 8u;
const VS: u32 = EVP + 8u;
const SS: u32 = BK + 4u;
const PS: u32 = BK + 8u;
const V0: u32 = BK * KS;    // the V tile follows the K tile

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> mu: array<f32>;
@group(0) @binding(5) var<storage, read> coeffs: array<f32>;
@group(0) @binding(6) var<storage, read_write> diag: array<f32>;
@group(0) @binding(7) var<storage, read> vnorm: array<f32>; // per unit: vmin, 1 / vrange, vrange
{{IO_COUNTER_DECL}}

// Every workgroup variable is a whole number of 16-byte units (see the strides above).
// First the Q block (read into registers once), then the [K tile | V tile] of each step.
var<workgroup> kv_t: array<f16, {{KV_T}}>;
// Per subgroup: its scores (16 x SS), also the staging tile of its accumulators.
var<workgroup> s_t: array<f32, {{S_T}}>;
// Per subgroup: its weights (16 x PS), the A operand of P V.
var<workgroup> p_t: array<f16, {{P_T}}>;
// Each row's D, which the store of the other columns needs.
var<workgroup> d_t: array<f32, BQ>;
var<workgroup> mu_t: array<f32, {{MU_T}}>;
var<workgroup> c_t: array<f32, {{C_T}}>;
var<workgroup> vn_t: array<f32, {{VN_T}}>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let head = wid.y;
    let unit = head / params.group;
    let q0 = wid.x * BQ;
    let rows = min(BQ, params.l - q0);
    // Keys c0 .. j_end - 1 of the block's chunk; key j is visible to row i when j <= i.
    let c0 = (q0 / params.chunk) * params.chunk;
    let j_end = min(q0 + rows, params.s);
    let row0 = sg * 16u; // this subgroup's first row in the block
    let sb = row0 * SS;  // its slice of s_t
    let pb = row0 * PS;  // its slice of p_t
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
    for (var i = lid; i < 3u * EV; i += WG) {
        vn_t[i] = vnorm[unit * 3u * EV + i];
        words_read += 1u;
    }
    for (var i = lid; i < {{S_T}}u; i += WG) {
        s_t[i] = 0.0;
    }
    // The Q block, padding rows and columns zero.
    for (var i = lid; i < BQ * EP; i += WG) {
        let r = i / EP;
        let c = i % EP;
        var x = 0.0;
        if (r < rows && c < E) {
            x = q[(head * params.l + q0 + r) * E + c] * params.q_scale;
            words_read += 1u;
        }
        kv_t[r * KS + c] = f16(x);
    }
    workgroupBarrier();
    // Accumulators start from a zero tile loaded from memory: naga writes a zero-constructed
    // coop_mat as OpConstantNull, which gave garbage on NVIDIA's driver (poly passes, H100).
    let zero_acc = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb], 16u);
{{Q_FRAGS}}
{{ACC_DECL}}
    for (var j0 = c0; j0 < j_end; j0 += BK) {
        let kr = min(BK, j_end - j0);
        // Every subgroup is done with the Q block or the previous tile.
        workgroupBarrier();
        // The tile: keys past kr and padding columns zero; the ones column of V' at EV.
        for (var i = lid; i < BK * EP; i += WG) {
            let j = i / EP;
            let c = i % EP;
            var x = 0.0;
            if (j < kr && c < E) {
                x = (k[(unit * params.s + j0 + j) * E + c] - mu_t[c]) * params.k_inv_scale;
                words_read += 1u;
            }
            kv_t[j * KS + c] = f16(x);
        }
        for (var i = lid; i < BK * EVP; i += WG) {
            let j = i / EVP;
            let c = i % EVP;
            var x = 0.0;
            if (j < kr) {
                if (c < EV) {
                    x = (v[(unit * params.s + j0 + j) * EV + c] - vn_t[c]) * vn_t[EV + c];
                    words_read += 1u;
                } else if (c == EV) {
                    x = 1.0;
                }
            }
            kv_t[V0 + j * VS + c] = f16(x);
        }
        workgroupBarrier();
        // Scores of this subgroup's rows, staged in its slice of s_t.
{{SCORES}}
        subgroupBarrier();
        // The polynomial in f32; hidden keys (j > i), padding keys and padding rows weigh nothing.
        for (var i = lane; i < 16u * BK; i += SG) {
            let r = i / BK;
            let j = i % BK;
            let x = s_t[sb + r * SS + j];
{{HORNER}}
            if (row0 + r >= rows || j >= kr || j0 + j > q0 + row0 + r) {
                p = 0.0;
            }
            p_t[pb + r * PS + j] = f16(p);
        }
        subgroupBarrier();
{{PV}}
    }
    coopStoreT(o_{{D_TILE}}, &s_t[sb], 16u);
    subgroupBarrier();
    for (var i = lane; i < 16u; i += SG) {
        d_t[row0 + i] = s_t[sb + i * 16u + {{D_COL}}u];
    }
    subgroupBarrier();
{{STORE}}
{{IO_COUNTER_ADD}}
}
