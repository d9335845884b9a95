// Poly pass 1: S'[f, :] = sum_j phi_k(k_j - mu)[f] * [v_j | 1] for the feature rows f of this
// workgroup's chunk, over this workgroup's share of the keys. Features are built in workgroup
// memory from the key tile and never written to storage; the partial S' of each key split is.
// Thread (tf, tc) keeps its rows of the chunk (`micro_tile_row` in `src/poly/kernel_f32.rs`: rows 4 tf
// + 0..3, 4 (tf + TF) + 0..3, ... where it owns a multiple of 4, else tf, tf + TF, ...) for value
// columns 4*(tc + TC*u) + 0..3 in named registers for the whole key loop (`src/poly/kernel_f32.rs`
// unrolls the micro-tile). The ones column (the row sums of phi) is summed by the threads that
// build the features: thread lid builds features lid % RC + WG * c of keys lid / RC + KG * m.

struct Params {
    s: u32,              // key rows per unit in this dispatch
    keys_per_split: u32,
    splits: u32,
    k_inv_scale: f32,    // 1 / the key scale of the coop pass 1; this pass does not scale keys
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;     // key row plus the constant 1 that pads lower-degree monomials
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;   // value row plus the ones column that yields the normaliser
const R: u32 = {{R}}u;      // features in total
const RC: u32 = {{RC}}u;    // feature rows per workgroup (TF x rows per thread)
const BK: u32 = {{BK}}u;
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;    // index words per feature (3 indices of 10 bits per word)
const TF: u32 = {{TF}}u;    // thread grid TF x TC
const TC: u32 = {{TC}}u;
const CW: u32 = {{CW}}u;    // vec4 per V tile row: EV columns padded to whole thread columns
const WG: u32 = TF * TC;
const KG: u32 = {{KG}}u;    // key groups of the feature build

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> mu: array<f32>;
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;{{GATE_DECL}}
{{IO_COUNTER_DECL}}

var<workgroup> k_tile: array<f32, {{K_TILE}}>;
var<workgroup> v_tile: array<vec4<f32>, {{V_TILE}}>;
// phi[j * RC + f]; after the key loop, the normaliser partials (key group * RC + f).
var<workgroup> phi: array<{{PHI_ELEM}}, {{PHI}}>;
var<workgroup> idx_t: array<u32, {{IDX}}>;
var<workgroup> mu_t: array<f32, E>;

fn phi_set(i: u32, x: f32) {
{{PHI_SET}}
}

fn phi_get(i: u32) -> f32 {
{{PHI_GET}}
}

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let split = wid.x;
    let f0 = wid.y * RC;
    let unit = wid.z;
    let rows_f = min(RC, R - f0);
    let j_begin = split * params.keys_per_split;
    let j_end = min(params.s, j_begin + params.keys_per_split);
    let tf = lid / TC;
    let tc = lid % TC;
    var words_read = 0u;
    var words_written = 0u;

    for (var i = lid; i < E; i += WG) {
        mu_t[i] = mu[unit * E + i];
        words_read += 1u;
    }
    for (var i = lid; i < RC * IW; i += WG) {
        var w = 0u;
        if (i / IW < rows_f) {
            w = feat_idx[f0 * IW + i];
            words_read += 1u;
        }
        idx_t[i] = w;
    }
    // The padding columns of the V tile are never loaded: zero them once.
    for (var i = lid; i < BK * CW; i += WG) {
        v_tile[i] = vec4<f32>();
    }
    workgroupBarrier();
    // This thread's features (their index decoding hoisted out of the key loop) and keys.
    let fb = lid % RC;
    let jg = lid / RC;
    let builds = lid < RC * KG;
{{BUILD_DECL}}
{{ACC_DECL}}
    // With the register prefetch (an autotune option), the next key/value tile is loaded while
    // this one is multiplied; without it, PREFETCH_STORE loads each tile straight from storage.
{{PREFETCH_DECL}}
{{PREFETCH_LOAD_FIRST}}
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        let kr = min(BK, j_end - j0);
{{PREFETCH_STORE}}{{GATE_LOAD}}
        workgroupBarrier();
        if (j0 + BK < j_end) {
{{PREFETCH_LOAD_NEXT}}
        }
        // Keys past kr are padding (phi of the zero key is not zero): neither built nor summed.
        if (builds) {
            for (var j = jg; j < kr; j += KG) {
{{BUILD}}
            }
        }
        workgroupBarrier();
        // The product stops at kr too.
        if (kr == BK) {
{{PRODUCT_FULL}}
        } else {
            for (var j = 0u; j < kr; j++) {
{{PRODUCT}}
            }
        }
        workgroupBarrier();
    }

    let o = ((unit * params.splits + split) * R + f0) * EV1;
{{STORE}}
    // The normaliser partials go into the feature tile once every thread is past the product.
    workgroupBarrier();
{{D_STORE}}
    workgroupBarrier();
    for (var f = lid; f < rows_f; f += WG) {
        var d = 0.0;
        for (var h = 0u; h < KG; h++) {
            d += phi_get(h * RC + f);
        }
        partial[o + f * EV1 + EV] = d;
        words_written += 1u;
    }
{{IO_COUNTER_ADD}}
}
