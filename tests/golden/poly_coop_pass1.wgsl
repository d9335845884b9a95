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

const E: u32 = 64u;
const E1: u32 = E + 1u;     // key row plus the constant 1 that pads lower-degree monomials
const EV: u32 = 64u;
const EV1: u32 = EV + 1u;
const R: u32 = 2145u;
const RC: u32 = 256u;    // feature rows per workgroup: SUBGROUPS * RT * 16
const BK: u32 = 32u;    // keys per tile, a multiple of 16
const G: u32 = 2u;
const IW: u32 = 1u;
const WG: u32 = 256u;
const SG: u32 = 32u;    // subgroup size (the adapter has exactly one)
const RT: u32 = 2u;
const TPR: u32 = WG / RC;   // threads per feature row in the feature build
const KS: u32 = BK + 1u;    // row stride of the transposed key tile (odd: no bank conflicts)
const FS: u32 = RC + 8u;    // row stride of the (key-major) feature tile, in halves
const VS: u32 = 64u + 8u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> mu: array<f32>;
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read> vnorm: array<f32>; // per unit: vmin, then 1 / vrange
@group(0) @binding(6) var<storage, read_write> partial: array<f32>;


// Every workgroup variable is a whole number of 16-byte units: NVIDIA's driver packs them (in an
// order of its own) and a cooperative load or store from an address that is not 16-byte aligned
// returns garbage (measured on the H100: E = 7, 9, 15 or Ev = 33 broke before the padding).
var<workgroup> stage: array<f32, 2048>;
var<workgroup> zero_t: array<f32, 256>;        // initialises the accumulators // one 16 x 16 tile per subgroup
var<workgroup> phi: array<f16, 8448>;     // phi[j * FS + f]: lanes write consecutive f
var<workgroup> v_t: array<f16, 2304>;  // v_t[j * VS + c]
var<workgroup> k_t: array<f32, 2148>;  // k_t[c * KS + j]: column c of key j, centred, scaled
var<workgroup> idx_t: array<u32, 256>;
var<workgroup> mu_t: array<f32, 64>;
var<workgroup> vn_t: array<f32, 128>;
var<workgroup> zsum_t: array<f32, WG>;

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

@compute @workgroup_size(256)
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
    let i_0 = feature_index(fb, 0u);
    let i_1 = feature_index(fb, 1u);
    var zsum = 0.0;
    var acc_0_0 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_0_1 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_0_2 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_0_3 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_1_0 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_1_1 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_1_2 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    var acc_1_3 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
    // The next key tile is loaded into registers while this one is multiplied (one barrier per
    // tile hides the global-load latency). Keys past the split's end are zero columns, the
    // constant 1 included: their features are all zero.
    var kr_t = 0u; // keys of the tile held in registers
    let ki_0 = lid + 0u;
    let krow_0 = ki_0 / 16u;
    let kc_0 = ki_0 % 16u;
    let kmu_0 = vec4<f32>(mu_t[4u * kc_0], mu_t[4u * kc_0 + 1u], mu_t[4u * kc_0 + 2u], mu_t[4u * kc_0 + 3u]);
    var kx_0 = vec4<f32>();
    let ki_1 = lid + 256u;
    let krow_1 = ki_1 / 16u;
    let kc_1 = ki_1 % 16u;
    let kmu_1 = vec4<f32>(mu_t[4u * kc_1], mu_t[4u * kc_1 + 1u], mu_t[4u * kc_1 + 2u], mu_t[4u * kc_1 + 3u]);
    var kx_1 = vec4<f32>();
    let vi_0 = lid + 0u;
    let vrow_0 = vi_0 / 16u;
    let vc_0 = vi_0 % 16u;
    let vmin_0 = vec4<f32>(vn_t[4u * vc_0], vn_t[4u * vc_0 + 1u], vn_t[4u * vc_0 + 2u], vn_t[4u * vc_0 + 3u]);
    let vinv_0 = vec4<f32>(vn_t[EV + 4u * vc_0], vn_t[EV + 4u * vc_0 + 1u], vn_t[EV + 4u * vc_0 + 2u], vn_t[EV + 4u * vc_0 + 3u]);
    var vx_0 = vec4<f32>();
    let vi_1 = lid + 256u;
    let vrow_1 = vi_1 / 16u;
    let vc_1 = vi_1 % 16u;
    let vmin_1 = vec4<f32>(vn_t[4u * vc_1], vn_t[4u * vc_1 + 1u], vn_t[4u * vc_1 + 2u], vn_t[4u * vc_1 + 3u]);
    let vinv_1 = vec4<f32>(vn_t[EV + 4u * vc_1], vn_t[EV + 4u * vc_1 + 1u], vn_t[EV + 4u * vc_1 + 2u], vn_t[EV + 4u * vc_1 + 3u]);
    var vx_1 = vec4<f32>();
    if (j_begin < j_end) {
        {
            kr_t = min(BK, j_end - (j_begin));
            kx_0 = vec4<f32>();
            if (ki_0 < BK * 16u && krow_0 < kr_t) {
                kx_0 = (k[(unit * params.s + j_begin + krow_0) * 16u + kc_0] - kmu_0) * params.k_inv_scale;
                words_read += 4u;
            }
            kx_1 = vec4<f32>();
            if (ki_1 < BK * 16u && krow_1 < kr_t) {
                kx_1 = (k[(unit * params.s + j_begin + krow_1) * 16u + kc_1] - kmu_1) * params.k_inv_scale;
                words_read += 4u;
            }
            vx_0 = vec4<f32>();
            if (vi_0 < BK * 16u && vrow_0 < kr_t) {
                vx_0 = (v[(unit * params.s + j_begin + vrow_0) * 16u + vc_0] - vmin_0) * vinv_0;
                words_read += 4u;
            }
            vx_1 = vec4<f32>();
            if (vi_1 < BK * 16u && vrow_1 < kr_t) {
                vx_1 = (v[(unit * params.s + j_begin + vrow_1) * 16u + vc_1] - vmin_1) * vinv_1;
                words_read += 4u;
            }
        }
    }
    for (var j0 = j_begin; j0 < j_end; j0 += BK) {
        for (var j = lid; j < BK; j += WG) {
            k_t[E * KS + j] = select(0.0, 1.0, j < kr_t);
        }
        if (ki_0 < BK * 16u) {
            let c = 4u * kc_0;
            k_t[(c + 0u) * KS + krow_0] = kx_0.x;
            k_t[(c + 1u) * KS + krow_0] = kx_0.y;
            k_t[(c + 2u) * KS + krow_0] = kx_0.z;
            k_t[(c + 3u) * KS + krow_0] = kx_0.w;
        }
        if (ki_1 < BK * 16u) {
            let c = 4u * kc_1;
            k_t[(c + 0u) * KS + krow_1] = kx_1.x;
            k_t[(c + 1u) * KS + krow_1] = kx_1.y;
            k_t[(c + 2u) * KS + krow_1] = kx_1.z;
            k_t[(c + 3u) * KS + krow_1] = kx_1.w;
        }
        if (vi_0 < BK * 16u) {
            let c = vrow_0 * VS + 4u * vc_0;
            v_t[c + 0u] = f16(vx_0.x);
            v_t[c + 1u] = f16(vx_0.y);
            v_t[c + 2u] = f16(vx_0.z);
            v_t[c + 3u] = f16(vx_0.w);
        }
        if (vi_1 < BK * 16u) {
            let c = vrow_1 * VS + 4u * vc_1;
            v_t[c + 0u] = f16(vx_1.x);
            v_t[c + 1u] = f16(vx_1.y);
            v_t[c + 2u] = f16(vx_1.z);
            v_t[c + 3u] = f16(vx_1.w);
        }
        workgroupBarrier();
        if (j0 + BK < j_end) {
            {
                kr_t = min(BK, j_end - (j0 + BK));
                kx_0 = vec4<f32>();
                if (ki_0 < BK * 16u && krow_0 < kr_t) {
                    kx_0 = (k[(unit * params.s + j0 + BK + krow_0) * 16u + kc_0] - kmu_0) * params.k_inv_scale;
                    words_read += 4u;
                }
                kx_1 = vec4<f32>();
                if (ki_1 < BK * 16u && krow_1 < kr_t) {
                    kx_1 = (k[(unit * params.s + j0 + BK + krow_1) * 16u + kc_1] - kmu_1) * params.k_inv_scale;
                    words_read += 4u;
                }
                vx_0 = vec4<f32>();
                if (vi_0 < BK * 16u && vrow_0 < kr_t) {
                    vx_0 = (v[(unit * params.s + j0 + BK + vrow_0) * 16u + vc_0] - vmin_0) * vinv_0;
                    words_read += 4u;
                }
                vx_1 = vec4<f32>();
                if (vi_1 < BK * 16u && vrow_1 < kr_t) {
                    vx_1 = (v[(unit * params.s + j0 + BK + vrow_1) * 16u + vc_1] - vmin_1) * vinv_1;
                    words_read += 4u;
                }
            }
        }
        for (var j = jb; j < BK; j += TPR) {
            let p = k_t[i_0 * KS + j] * k_t[i_1 * KS + j];
            zsum += p;
            phi[j * FS + fb] = f16(p);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk += 16u) {
            let a_0 = coopLoad<coop_mat16x16<f16, A>>(&phi[kk * FS + (sg * RT + 0u) * 16u], FS);
            let a_1 = coopLoad<coop_mat16x16<f16, A>>(&phi[kk * FS + (sg * RT + 1u) * 16u], FS);
            let b_0 = coopLoadT<coop_mat16x16<f16, B>>(&v_t[kk * VS + 0u], VS);
            acc_0_0 = coopMultiplyAdd(a_0, b_0, acc_0_0);
            acc_1_0 = coopMultiplyAdd(a_1, b_0, acc_1_0);
            let b_1 = coopLoadT<coop_mat16x16<f16, B>>(&v_t[kk * VS + 16u], VS);
            acc_0_1 = coopMultiplyAdd(a_0, b_1, acc_0_1);
            acc_1_1 = coopMultiplyAdd(a_1, b_1, acc_1_1);
            let b_2 = coopLoadT<coop_mat16x16<f16, B>>(&v_t[kk * VS + 32u], VS);
            acc_0_2 = coopMultiplyAdd(a_0, b_2, acc_0_2);
            acc_1_2 = coopMultiplyAdd(a_1, b_2, acc_1_2);
            let b_3 = coopLoadT<coop_mat16x16<f16, B>>(&v_t[kk * VS + 48u], VS);
            acc_0_3 = coopMultiplyAdd(a_0, b_3, acc_0_3);
            acc_1_3 = coopMultiplyAdd(a_1, b_3, acc_1_3);
        }
        workgroupBarrier();
    }
    zsum_t[lid] = zsum;

    let o = ((unit * params.splits + split) * R + f0) * EV1;
    coopStoreT(acc_0_0, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 0u) * 16u + i / 16u;
        let col = 0u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_0_1, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 0u) * 16u + i / 16u;
        let col = 16u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_0_2, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 0u) * 16u + i / 16u;
        let col = 32u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_0_3, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 0u) * 16u + i / 16u;
        let col = 48u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_1_0, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 1u) * 16u + i / 16u;
        let col = 0u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_1_1, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 1u) * 16u + i / 16u;
        let col = 16u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_1_2, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 1u) * 16u + i / 16u;
        let col = 32u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    coopStoreT(acc_1_3, &stage[sg * 256u], 16u);
    workgroupBarrier();
    for (var i = lane; i < 256u; i += SG) {
        let row = (sg * RT + 1u) * 16u + i / 16u;
        let col = 48u + i % 16u;
        if (row < rows_f && col < EV) {
            partial[o + row * EV1 + col] = stage[sg * 256u + i];
            words_written += 1u;
        }
    }
    workgroupBarrier();
    if (lid < rows_f) {
        var z = 0.0;
        for (var h = 0u; h < TPR; h++) {
            z += zsum_t[h * RC + lid];
        }
        partial[o + lid * EV1 + EV] = z;
        words_written += 1u;
    }

}
