// Poly pass 1 on cooperative matrices (tensor cores): S'[f, :] = sum_j phi(k'_j)[f] * v'_j for this
// workgroup's feature rows over its key split, f16 operands and f32 accumulators. The keys are
// centred and scaled, k' = (k - mu) * k_inv_scale, so every feature lies in [-1, 1]; the values are
// normalised, v' = (v - vmin) / vrange in [0, 1]; pass 2 undoes both. The normaliser column (the
// row sums of phi) is summed in f32 by the threads that build the features.
// Subgroup s owns the output rows 16 * (s * RT + a) + 0..15 of every 16-column value tile in the
// named accumulators acc_a_c (`src/poly/kernel_coop.rs` unrolls them).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    s: u32,              // key rows per unit in this dispatch
    keys_per_split: u32,
    splits: u32,
    k_inv_scale: f32,
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;     // key row plus the constant 1 that pads lower-degree monomials
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;    // feature rows per workgroup: SUBGROUPS * RT * 16
const BK: u32 = {{BK}}u;    // keys per tile, a multiple of 16
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;
const WG: u32 = {{WG}}u;
const SG: u32 = {{SG}}u;    // subgroup size (the adapter has exactly one)
const RT: u32 = {{RT}}u;
const TPR: u32 = WG / RC;   // threads per feature row in the feature build
const KS: u32 = BK + 1u;    // row stride of the transposed key tile (odd: no bank conflicts)
const FS: u32 = RC + 8u;    // row stride of the (key-major) feature tile, in halves
const VS: u32 = {{EVP}}u + 8u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> k: array<{{KV_TYPE}}>;
@group(0) @binding(2) var<storage, read> v: array<{{KV_TYPE}}>;
@group(0) @binding(3) var<storage, read> mu: array<f32>;
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read> vnorm: array<f32>; // per unit: vmin, then 1 / vrange
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;
{{IO_COUNTER_DECL}}

// Every workgroup variable is a whole number of 16-byte units: NVIDIA's driver packs them (in an
// order of its own) and a cooperative load or store from an address that is not 16-byte aligned
// returns garbage (measured on the H100: E = 7, 9, 15 or Ev = 33 broke before the padding).
var<workgroup> stage: array<f32, {{STAGE}}>;
var<workgroup> zero_t: array<f32, 256>;        // initialises the accumulators // one 16 x 16 tile per subgroup
var<workgroup> phi: array<f16, {{PHI}}>;     // phi[j * FS + f]: lanes write consecutive f
var<workgroup> v_t: array<f16, {{V_TILE}}>;  // v_t[j * VS + c]
var<workgroup> k_t: array<f32, {{K_TILE}}>;  // k_t[c * KS + j]: column c of key j, centred, scaled
var<workgroup> idx_t: array<u32, {{IDX}}>;
var<workgroup> mu_t: array<f32, {{MU}}>;
var<workgroup> vn_t: array<f32, {{VN}}>;
var<workgroup> zsum_t: array<f32, WG>;

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let split = wid.x;
    let f0 = wid.y * RC;
    let unit = wid.z;
    let rows_f = min(RC, R - f0);
    let j_begin = split * params.keys_per_split;
    let j_end = min(params.s, j_begin + params.keys_per_split);
    var words_read = 0u;
    var words_written = 0u;

    for (var i = lid; i < E; i += WG) {
        mu_t[i] = mu[unit * E + i];
        words_read += 1u;
    }
    for (var i = lid; i < 2u * EV; i += WG) {
        vn_t[i] = vnorm[unit * 2u * EV + i];
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
    // The padding columns of the value tile are never loaded: zero them once.
    for (var i = lid; i < BK * VS; i += WG) {
        v_t[i] = f16(0.0);
    }
    for (var i = lid; i < 256u; i += WG) {
        zero_t[i] = 0.0;
    }
    workgroupBarrier();
    // This thread builds feature row fb for keys jb, jb + TPR, ...
    let fb = lid % RC;
    let jb = lid / RC;
{{INDEX_DECL}}
    var zsum = 0.0;
{{ACC_DECL}}
    // The next key tile is loaded into registers while this one is multiplied (one barrier per
    // tile hides the global-load latency). Keys past the split's end are zero columns, the
    // constant 1 included: their features are all zero.
{{PREFETCH_DECL}}
{{PREFETCH_LOAD_FIRST}}
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
{{PREFETCH_STORE}}
        workgroupBarrier();
        if (j0 + BK < j_end) {
{{PREFETCH_LOAD_NEXT}}
        }
        for (var j = jb; j < BK; j += TPR) {
            let p = {{FEATURE}};
            zsum += p;
            phi[j * FS + fb] = f16(p);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
{{MMA}}
        }
        workgroupBarrier();
    }
    zsum_t[lid] = zsum;

    let o = ((unit * params.splits + split) * R + f0) * EV1;
{{STORE}}
    if (lid < rows_f) {
        var z = 0.0;
        for (var h = 0u; h < TPR; h++) {
            z += zsum_t[h * RC + lid];
        }
        partial[o + lid * EV1 + EV] = z;
        words_written += 1u;
    }
{{IO_COUNTER_ADD}}
}
