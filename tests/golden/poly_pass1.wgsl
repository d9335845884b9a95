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

const E: u32 = 64u;
const E1: u32 = E + 1u;     // key row plus the constant 1 that pads lower-degree monomials
const EV: u32 = 64u;
const EV1: u32 = EV + 1u;   // value row plus the ones column that yields the normaliser
const R: u32 = 2145u;      // features in total
const RC: u32 = 256u;    // feature rows per workgroup (TF x rows per thread)
const BK: u32 = 16u;
const G: u32 = 2u;
const IW: u32 = 1u;    // index words per feature (3 indices of 10 bits per word)
const TF: u32 = 32u;    // thread grid TF x TC
const TC: u32 = 8u;
const CW: u32 = 16u;    // vec4 per V tile row: EV columns padded to whole thread columns
const WG: u32 = TF * TC;
const KG: u32 = 1u;    // key groups of the feature build

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> mu: array<f32>;
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;


var<workgroup> k_tile: array<f32, 1040>;
var<workgroup> v_tile: array<vec4<f32>, 256>;
// phi[j * RC + f]; after the key loop, the normaliser partials (key group * RC + f).
var<workgroup> phi: array<vec4<f32>, 1024>;
var<workgroup> idx_t: array<u32, 256>;
var<workgroup> mu_t: array<f32, E>;

fn phi_set(i: u32, x: f32) {
    phi[i / 4u][i % 4u] = x;
}

fn phi_get(i: u32) -> f32 {
    return phi[i / 4u][i % 4u];
}

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

@compute @workgroup_size(256)
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
    let f_0 = fb + 0u;
    var dk_0 = 0.0;
    let fo_0_0 = feature_index(min(f_0, RC - 1u), 0u);
    let fo_0_1 = feature_index(min(f_0, RC - 1u), 1u);
    var acc_0_0 = vec4<f32>();
    var acc_0_1 = vec4<f32>();
    var acc_1_0 = vec4<f32>();
    var acc_1_1 = vec4<f32>();
    var acc_2_0 = vec4<f32>();
    var acc_2_1 = vec4<f32>();
    var acc_3_0 = vec4<f32>();
    var acc_3_1 = vec4<f32>();
    var acc_4_0 = vec4<f32>();
    var acc_4_1 = vec4<f32>();
    var acc_5_0 = vec4<f32>();
    var acc_5_1 = vec4<f32>();
    var acc_6_0 = vec4<f32>();
    var acc_6_1 = vec4<f32>();
    var acc_7_0 = vec4<f32>();
    var acc_7_1 = vec4<f32>();
    // With the register prefetch (an autotune option), the next key/value tile is loaded while
    // this one is multiplied; without it, PREFETCH_STORE loads each tile straight from storage.


    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        let kr = min(BK, j_end - j0);
        for (var i = lid; i < BK * E1; i += WG) {
            let r = i / E1;
            let c = i % E1;
            var x = 1.0;
            if (c < E) {
                x = 0.0;
                if (r < kr) {
                    x = k[(unit * params.s + j0 + r) * E + c] - mu_t[c];
                    words_read += 1u;
                }
            }
            k_tile[i] = x;
        }
        for (var i = lid; i < BK * EV; i += WG) {
            let r = i / EV;
            let c = i % EV;
            var x = 0.0;
            if (r < kr) {
                x = v[(unit * params.s + j0 + r) * EV + c];
                words_read += 1u;
            }
            v_tile[r * CW + c / 4u][c % 4u] = x;
        }
        workgroupBarrier();
        if (j0 + BK < j_end) {

        }
        // Keys past kr are padding (phi of the zero key is not zero): neither built nor summed.
        if (builds) {
            for (var j = jg; j < kr; j += KG) {
                let kb = j * E1;
                if (true) {
                    let p_0 = k_tile[kb + fo_0_0] * k_tile[kb + fo_0_1];
                    phi_set(j * RC + f_0, p_0);
                    dk_0 += p_0;
                }
            }
        }
        workgroupBarrier();
        // The product stops at kr too.
        if (kr == BK) {
            {
                let j = 0u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 1u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 2u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 3u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 4u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 5u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 6u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 7u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 8u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 9u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 10u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 11u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 12u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 13u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 14u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
            {
                let j = 15u;
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
        } else {
            for (var j = 0u; j < kr; j++) {
                let ph_0 = phi[j * RC / 4u + tf + 0u];
                let ph_1 = phi[j * RC / 4u + tf + 32u];
                let p_0 = ph_0.x;
                let p_1 = ph_0.y;
                let p_2 = ph_0.z;
                let p_3 = ph_0.w;
                let p_4 = ph_1.x;
                let p_5 = ph_1.y;
                let p_6 = ph_1.z;
                let p_7 = ph_1.w;
                let x_0 = v_tile[j * CW + tc + 0u];
                let x_1 = v_tile[j * CW + tc + 8u];
                acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                acc_4_0 = fma(vec4<f32>(p_4), x_0, acc_4_0);
                acc_4_1 = fma(vec4<f32>(p_4), x_1, acc_4_1);
                acc_5_0 = fma(vec4<f32>(p_5), x_0, acc_5_0);
                acc_5_1 = fma(vec4<f32>(p_5), x_1, acc_5_1);
                acc_6_0 = fma(vec4<f32>(p_6), x_0, acc_6_0);
                acc_6_1 = fma(vec4<f32>(p_6), x_1, acc_6_1);
                acc_7_0 = fma(vec4<f32>(p_7), x_0, acc_7_0);
                acc_7_1 = fma(vec4<f32>(p_7), x_1, acc_7_1);
            }
        }
        workgroupBarrier();
    }

    let o = ((unit * params.splits + split) * R + f0) * EV1;
    {
        let f = (4u * (tf + 0u) + 0u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_0_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_0_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_0_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_0_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_0_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_0_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_0_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_0_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 0u) + 1u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_1_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_1_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_1_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_1_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_1_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_1_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_1_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_1_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 0u) + 2u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_2_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_2_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_2_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_2_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_2_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_2_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_2_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_2_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 0u) + 3u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_3_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_3_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_3_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_3_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_3_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_3_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_3_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_3_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 32u) + 0u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_4_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_4_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_4_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_4_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_4_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_4_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_4_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_4_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 32u) + 1u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_5_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_5_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_5_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_5_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_5_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_5_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_5_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_5_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 32u) + 2u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_6_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_6_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_6_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_6_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_6_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_6_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_6_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_6_1.w;
                words_written += 1u;
            }
        }
    }
    {
        let f = (4u * (tf + 32u) + 3u);
        if (f < rows_f) {
            let c_0 = 4u * (tc + 0u);
            if (c_0 + 0u < EV) {
                partial[o + f * EV1 + c_0 + 0u] = acc_7_0.x;
                words_written += 1u;
            }
            if (c_0 + 1u < EV) {
                partial[o + f * EV1 + c_0 + 1u] = acc_7_0.y;
                words_written += 1u;
            }
            if (c_0 + 2u < EV) {
                partial[o + f * EV1 + c_0 + 2u] = acc_7_0.z;
                words_written += 1u;
            }
            if (c_0 + 3u < EV) {
                partial[o + f * EV1 + c_0 + 3u] = acc_7_0.w;
                words_written += 1u;
            }
            let c_1 = 4u * (tc + 8u);
            if (c_1 + 0u < EV) {
                partial[o + f * EV1 + c_1 + 0u] = acc_7_1.x;
                words_written += 1u;
            }
            if (c_1 + 1u < EV) {
                partial[o + f * EV1 + c_1 + 1u] = acc_7_1.y;
                words_written += 1u;
            }
            if (c_1 + 2u < EV) {
                partial[o + f * EV1 + c_1 + 2u] = acc_7_1.z;
                words_written += 1u;
            }
            if (c_1 + 3u < EV) {
                partial[o + f * EV1 + c_1 + 3u] = acc_7_1.w;
                words_written += 1u;
            }
        }
    }
    // The normaliser partials go into the feature tile once every thread is past the product.
    workgroupBarrier();
    if (builds && true) {
        phi_set(jg * RC + f_0, dk_0);
    }
    workgroupBarrier();
    for (var f = lid; f < rows_f; f += WG) {
        var d = 0.0;
        for (var h = 0u; h < KG; h++) {
            d += phi_get(h * RC + f);
        }
        partial[o + f * EV1 + EV] = d;
        words_written += 1u;
    }

}
