// Poly pass 2 on cooperative matrices (tensor cores): O = vmin + vrange * (Phi(Q') S'') / D for a
// block of BQ query rows, over S' in chunks of RC feature rows. Q' = Q * k_scale undoes pass 1's
// key scaling (each monomial has the same degree in q and k); S'' = S' / keys (f16, packed by
// poly_coop_pack.wgsl, at most 1) is staged through workgroup memory chunk by chunk, the next
// chunk (and its slice of the feature table) loaded into registers while this one is multiplied;
// the output multiplies keys back. D = Phi(Q') z, with z the normaliser column of S', is summed in
// f32 by the threads that build the features.
// Subgroup s owns the query rows 16 * (s * RT + a) + 0..15 of every 16-column value tile in the
// named accumulators acc_a_c (`src/poly/kernel_coop.rs` unrolls them).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    l: u32,       // query rows per head in this dispatch
    blocks: u32,  // query blocks per head
    group: u32,   // query heads per KV head
    chunks: u32,  // S' chunks
    k_scale: f32,
    keys: f32,    // key rows per unit (S'' = S' / keys)
    _pad0: u32,
    _pad1: u32,
}

const E: u32 = 64u;
const E1: u32 = E + 1u;
// Row stride of the query tile: QS = 32 / HB (mod 32) puts the HB rows and 32 / HB consecutive
// feature indices that a 32-wide subgroup reads at once into 32 different memory banks.
const QS: u32 = 68u;
const EV: u32 = 64u;
const EV1: u32 = EV + 1u;
const R: u32 = 2145u;
const RC: u32 = 64u;    // feature rows per chunk, a multiple of 16
const BQ: u32 = 64u;      // query rows per block: SUBGROUPS * RT * 16
const G: u32 = 2u;
const IW: u32 = 1u;
const WG: u32 = 128u;
const SG: u32 = 32u;
const RT: u32 = 1u;
const RPT: u32 = 8u;    // query rows per feature-building thread: r, r + HB, ...
const HB: u32 = BQ / RPT;
const TPR: u32 = WG / HB;    // threads per query row group in the feature build
// After the last chunk the query tile is dead and holds the output staging tiles (one per
// subgroup, from STAGE0) and the normaliser partials (TPR per row, from DT0), then the row sums
// (from DT0 + DS).
const STAGE0: u32 = 0u;
const DT0: u32 = 1024u;
const DS: u32 = TPR * BQ;
const FS: u32 = BQ + 8u;    // row stride of the (feature-major) feature tile, in halves
const EVP: u32 = 64u;  // value columns padded to 16: the row stride of S''
const RP: u32 = 2176u;    // feature rows of S'' per unit, padded to whole chunks
const SS: u32 = EVP + 8u;   // row stride of the S'' chunk in workgroup memory, in halves

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s16: array<vec4<f16>>; // S'' rows of EVP, RP per unit
@group(0) @binding(3) var<storage, read> z: array<f32>;   // normaliser column, RP per unit
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read> feat_w: array<f32>;
@group(0) @binding(6) var<storage, read> vnorm: array<f32>; // per unit: vmin, then vrange
@group(0) @binding(7) var<storage, read_write> o: array<f32>;


// Every workgroup variable is a whole number of 16-byte units: NVIDIA's driver packs them (in an
// order of its own) and a cooperative load or store from an address that is not 16-byte aligned
// returns garbage (measured on the H100: E = 7, 9, 15 or Ev = 33 broke before the padding).
var<workgroup> zero_t: array<f32, 256>;        // initialises the accumulators
var<workgroup> phi: array<f16, 4608>;     // phi[f * FS + r]: lanes write consecutive r
var<workgroup> s_t: array<f16, 4608>;  // s_t[f * SS + c]: this chunk of S''
var<workgroup> q_t: array<f32, 4352>;  // q_t[r * QS + c], then the tail above
var<workgroup> wz_t: array<vec2<f32>, RC>;  // the chunk's feature weights and normaliser column
var<workgroup> idx_t: array<u32, 128>;      // idx_t[f * G + t]: unpacked feature indices
var<workgroup> vn_t: array<f32, 128>;

fn feature_index(f: u32, t: u32) -> u32 {
    return idx_t[f * G + t];
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let head = wid.y;
    let unit = head / params.group;
    var words_read = 0u;
    var words_written = 0u;
    for (var i = lid; i < 2u * EV; i += WG) {
        vn_t[i] = vnorm[unit * 2u * EV + i];
        words_read += 1u;
    }
    for (var i = lid; i < 256u; i += WG) {
        zero_t[i] = 0.0;
    }
    workgroupBarrier();
    // This thread builds the features of query rows rb, rb + HB, ..., chunk rows fb, fb + TPR,
    // ...: one read of the feature's indices and weight serves RPT rows.
    let rb = lid % HB;
    let fb = lid / HB;
    for (var qb = wid.x; qb < params.blocks; qb += nwg.x) {
        let q0 = qb * BQ;
        let rows = min(BQ, params.l - q0);
        for (var i = lid; i < BQ * E1; i += WG) {
            let r = i / E1;
            let c = i % E1;
            var x = 1.0;
            if (c < E) {
                x = 0.0;
                if (r < rows) {
                    x = q[(head * params.l + q0 + r) * E + c] * params.k_scale;
                    words_read += 1u;
                }
            }
            q_t[r * QS + c] = x;
        }
        var d_0 = 0.0;
        var d_1 = 0.0;
        var d_2 = 0.0;
        var d_3 = 0.0;
        var d_4 = 0.0;
        var d_5 = 0.0;
        var d_6 = 0.0;
        var d_7 = 0.0;
        var acc_0_0 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
        var acc_0_1 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
        var acc_0_2 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
        var acc_0_3 = coopLoadT<coop_mat16x16<f32, C>>(&zero_t[0], 16u);
        let si_0 = lid + 0u;
        var sx_0 = vec4<f16>();
        let si_1 = lid + 128u;
        var sx_1 = vec4<f16>();
        let si_2 = lid + 256u;
        var sx_2 = vec4<f16>();
        let si_3 = lid + 384u;
        var sx_3 = vec4<f16>();
        let si_4 = lid + 512u;
        var sx_4 = vec4<f16>();
        let si_5 = lid + 640u;
        var sx_5 = vec4<f16>();
        let si_6 = lid + 768u;
        var sx_6 = vec4<f16>();
        let si_7 = lid + 896u;
        var sx_7 = vec4<f16>();
        if (si_0 < RC * EVP / 4u) {
            sx_0 = s16[(unit * RP + 0u) * EVP / 4u + si_0];
            words_read += 2u;
        }
        if (si_1 < RC * EVP / 4u) {
            sx_1 = s16[(unit * RP + 0u) * EVP / 4u + si_1];
            words_read += 2u;
        }
        if (si_2 < RC * EVP / 4u) {
            sx_2 = s16[(unit * RP + 0u) * EVP / 4u + si_2];
            words_read += 2u;
        }
        if (si_3 < RC * EVP / 4u) {
            sx_3 = s16[(unit * RP + 0u) * EVP / 4u + si_3];
            words_read += 2u;
        }
        if (si_4 < RC * EVP / 4u) {
            sx_4 = s16[(unit * RP + 0u) * EVP / 4u + si_4];
            words_read += 2u;
        }
        if (si_5 < RC * EVP / 4u) {
            sx_5 = s16[(unit * RP + 0u) * EVP / 4u + si_5];
            words_read += 2u;
        }
        if (si_6 < RC * EVP / 4u) {
            sx_6 = s16[(unit * RP + 0u) * EVP / 4u + si_6];
            words_read += 2u;
        }
        if (si_7 < RC * EVP / 4u) {
            sx_7 = s16[(unit * RP + 0u) * EVP / 4u + si_7];
            words_read += 2u;
        }
        var tix_0 = 0u;
        var twz_0 = vec2<f32>();
        {
            let rows_f = min(RC, R - (0u));
            tix_0 = 0u;
            if (lid + 0u < RC * IW && (lid + 0u) / IW < rows_f) {
                tix_0 = feat_idx[(0u) * IW + lid + 0u];
                words_read += 1u;
            }
            if (lid + 0u < RC) {
                twz_0 = vec2<f32>();
                twz_0.y = z[unit * RP + (0u) + lid + 0u];
                words_read += 1u;
                if (lid + 0u < rows_f) {
                    twz_0.x = feat_w[(0u) + lid + 0u];
                    words_read += 1u;
                }
            }
        }
        for (var ch = 0u; ch < params.chunks; ch++) {
            let f0 = ch * RC;
            // The previous chunk's products are done before its tiles are overwritten.
            workgroupBarrier();
            if (si_0 < RC * EVP / 4u) {
                let so = (si_0 * 4u) / EVP * SS + (si_0 * 4u) % EVP;
                s_t[so] = sx_0.x;
                s_t[so + 1u] = sx_0.y;
                s_t[so + 2u] = sx_0.z;
                s_t[so + 3u] = sx_0.w;
            }
            if (si_1 < RC * EVP / 4u) {
                let so = (si_1 * 4u) / EVP * SS + (si_1 * 4u) % EVP;
                s_t[so] = sx_1.x;
                s_t[so + 1u] = sx_1.y;
                s_t[so + 2u] = sx_1.z;
                s_t[so + 3u] = sx_1.w;
            }
            if (si_2 < RC * EVP / 4u) {
                let so = (si_2 * 4u) / EVP * SS + (si_2 * 4u) % EVP;
                s_t[so] = sx_2.x;
                s_t[so + 1u] = sx_2.y;
                s_t[so + 2u] = sx_2.z;
                s_t[so + 3u] = sx_2.w;
            }
            if (si_3 < RC * EVP / 4u) {
                let so = (si_3 * 4u) / EVP * SS + (si_3 * 4u) % EVP;
                s_t[so] = sx_3.x;
                s_t[so + 1u] = sx_3.y;
                s_t[so + 2u] = sx_3.z;
                s_t[so + 3u] = sx_3.w;
            }
            if (si_4 < RC * EVP / 4u) {
                let so = (si_4 * 4u) / EVP * SS + (si_4 * 4u) % EVP;
                s_t[so] = sx_4.x;
                s_t[so + 1u] = sx_4.y;
                s_t[so + 2u] = sx_4.z;
                s_t[so + 3u] = sx_4.w;
            }
            if (si_5 < RC * EVP / 4u) {
                let so = (si_5 * 4u) / EVP * SS + (si_5 * 4u) % EVP;
                s_t[so] = sx_5.x;
                s_t[so + 1u] = sx_5.y;
                s_t[so + 2u] = sx_5.z;
                s_t[so + 3u] = sx_5.w;
            }
            if (si_6 < RC * EVP / 4u) {
                let so = (si_6 * 4u) / EVP * SS + (si_6 * 4u) % EVP;
                s_t[so] = sx_6.x;
                s_t[so + 1u] = sx_6.y;
                s_t[so + 2u] = sx_6.z;
                s_t[so + 3u] = sx_6.w;
            }
            if (si_7 < RC * EVP / 4u) {
                let so = (si_7 * 4u) / EVP * SS + (si_7 * 4u) % EVP;
                s_t[so] = sx_7.x;
                s_t[so + 1u] = sx_7.y;
                s_t[so + 2u] = sx_7.z;
                s_t[so + 3u] = sx_7.w;
            }
            if (lid + 0u < RC * IW) {
                let i = lid + 0u;
                for (var t = 3u * (i % IW); t < min(G, 3u * (i % IW) + 3u); t++) {
                    idx_t[(i / IW) * G + t] = (tix_0 >> (10u * (t % 3u))) & 1023u;
                }
            }
            if (lid + 0u < RC) {
                wz_t[lid + 0u] = twz_0;
            }
            workgroupBarrier();
            if (ch + 1u < params.chunks) {
                if (si_0 < RC * EVP / 4u) {
                    sx_0 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_0];
                    words_read += 2u;
                }
                if (si_1 < RC * EVP / 4u) {
                    sx_1 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_1];
                    words_read += 2u;
                }
                if (si_2 < RC * EVP / 4u) {
                    sx_2 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_2];
                    words_read += 2u;
                }
                if (si_3 < RC * EVP / 4u) {
                    sx_3 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_3];
                    words_read += 2u;
                }
                if (si_4 < RC * EVP / 4u) {
                    sx_4 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_4];
                    words_read += 2u;
                }
                if (si_5 < RC * EVP / 4u) {
                    sx_5 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_5];
                    words_read += 2u;
                }
                if (si_6 < RC * EVP / 4u) {
                    sx_6 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_6];
                    words_read += 2u;
                }
                if (si_7 < RC * EVP / 4u) {
                    sx_7 = s16[(unit * RP + f0 + RC) * EVP / 4u + si_7];
                    words_read += 2u;
                }
                {
                    let rows_f = min(RC, R - (f0 + RC));
                    tix_0 = 0u;
                    if (lid + 0u < RC * IW && (lid + 0u) / IW < rows_f) {
                        tix_0 = feat_idx[(f0 + RC) * IW + lid + 0u];
                        words_read += 1u;
                    }
                    if (lid + 0u < RC) {
                        twz_0 = vec2<f32>();
                        twz_0.y = z[unit * RP + (f0 + RC) + lid + 0u];
                        words_read += 1u;
                        if (lid + 0u < rows_f) {
                            twz_0.x = feat_w[(f0 + RC) + lid + 0u];
                            words_read += 1u;
                        }
                    }
                }
            }
            // Feature rows past R have weight 0 and zero S'' rows.
            for (var f = fb; f < RC; f += TPR) {
                let wz = wz_t[f];
                let fi_0 = feature_index(f, 0u);
                let fi_1 = feature_index(f, 1u);
                let p_0 = wz.x * q_t[(rb + 0u * HB) * QS + fi_0] * q_t[(rb + 0u * HB) * QS + fi_1];
                d_0 = fma(p_0, wz.y, d_0);
                phi[f * FS + (rb + 0u * HB)] = f16(p_0);
                let p_1 = wz.x * q_t[(rb + 1u * HB) * QS + fi_0] * q_t[(rb + 1u * HB) * QS + fi_1];
                d_1 = fma(p_1, wz.y, d_1);
                phi[f * FS + (rb + 1u * HB)] = f16(p_1);
                let p_2 = wz.x * q_t[(rb + 2u * HB) * QS + fi_0] * q_t[(rb + 2u * HB) * QS + fi_1];
                d_2 = fma(p_2, wz.y, d_2);
                phi[f * FS + (rb + 2u * HB)] = f16(p_2);
                let p_3 = wz.x * q_t[(rb + 3u * HB) * QS + fi_0] * q_t[(rb + 3u * HB) * QS + fi_1];
                d_3 = fma(p_3, wz.y, d_3);
                phi[f * FS + (rb + 3u * HB)] = f16(p_3);
                let p_4 = wz.x * q_t[(rb + 4u * HB) * QS + fi_0] * q_t[(rb + 4u * HB) * QS + fi_1];
                d_4 = fma(p_4, wz.y, d_4);
                phi[f * FS + (rb + 4u * HB)] = f16(p_4);
                let p_5 = wz.x * q_t[(rb + 5u * HB) * QS + fi_0] * q_t[(rb + 5u * HB) * QS + fi_1];
                d_5 = fma(p_5, wz.y, d_5);
                phi[f * FS + (rb + 5u * HB)] = f16(p_5);
                let p_6 = wz.x * q_t[(rb + 6u * HB) * QS + fi_0] * q_t[(rb + 6u * HB) * QS + fi_1];
                d_6 = fma(p_6, wz.y, d_6);
                phi[f * FS + (rb + 6u * HB)] = f16(p_6);
                let p_7 = wz.x * q_t[(rb + 7u * HB) * QS + fi_0] * q_t[(rb + 7u * HB) * QS + fi_1];
                d_7 = fma(p_7, wz.y, d_7);
                phi[f * FS + (rb + 7u * HB)] = f16(p_7);
            }
            workgroupBarrier();
            for (var kk = 0u; kk < RC; kk += 16u) {
                let a_0 = coopLoad<coop_mat16x16<f16, A>>(&phi[kk * FS + (sg * RT + 0u) * 16u], FS);
                let b_0 = coopLoadT<coop_mat16x16<f16, B>>(&s_t[kk * SS + 0u], SS);
                acc_0_0 = coopMultiplyAdd(a_0, b_0, acc_0_0);
                let b_1 = coopLoadT<coop_mat16x16<f16, B>>(&s_t[kk * SS + 16u], SS);
                acc_0_1 = coopMultiplyAdd(a_0, b_1, acc_0_1);
                let b_2 = coopLoadT<coop_mat16x16<f16, B>>(&s_t[kk * SS + 32u], SS);
                acc_0_2 = coopMultiplyAdd(a_0, b_2, acc_0_2);
                let b_3 = coopLoadT<coop_mat16x16<f16, B>>(&s_t[kk * SS + 48u], SS);
                acc_0_3 = coopMultiplyAdd(a_0, b_3, acc_0_3);
            }
        }
        workgroupBarrier();
        q_t[DT0 + fb * BQ + (rb + 0u * HB)] = d_0;
        q_t[DT0 + fb * BQ + (rb + 1u * HB)] = d_1;
        q_t[DT0 + fb * BQ + (rb + 2u * HB)] = d_2;
        q_t[DT0 + fb * BQ + (rb + 3u * HB)] = d_3;
        q_t[DT0 + fb * BQ + (rb + 4u * HB)] = d_4;
        q_t[DT0 + fb * BQ + (rb + 5u * HB)] = d_5;
        q_t[DT0 + fb * BQ + (rb + 6u * HB)] = d_6;
        q_t[DT0 + fb * BQ + (rb + 7u * HB)] = d_7;
        workgroupBarrier();
        if (lid < BQ) {
            var z = 0.0;
            for (var h = 0u; h < TPR; h++) {
                z += q_t[DT0 + h * BQ + lid];
            }
            q_t[DT0 + DS + lid] = params.keys / z;
        }
        workgroupBarrier();
        coopStoreT(acc_0_0, &q_t[STAGE0 + sg * 256u], 16u);
        workgroupBarrier();
        for (var i = lane; i < 256u; i += SG) {
            let row = (sg * RT + 0u) * 16u + i / 16u;
            let col = 0u + i % 16u;
            if (row < rows && col < EV) {
                o[(head * params.l + q0 + row) * EV + col] =
                    vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);
                words_written += 1u;
            }
        }
        workgroupBarrier();
        coopStoreT(acc_0_1, &q_t[STAGE0 + sg * 256u], 16u);
        workgroupBarrier();
        for (var i = lane; i < 256u; i += SG) {
            let row = (sg * RT + 0u) * 16u + i / 16u;
            let col = 16u + i % 16u;
            if (row < rows && col < EV) {
                o[(head * params.l + q0 + row) * EV + col] =
                    vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);
                words_written += 1u;
            }
        }
        workgroupBarrier();
        coopStoreT(acc_0_2, &q_t[STAGE0 + sg * 256u], 16u);
        workgroupBarrier();
        for (var i = lane; i < 256u; i += SG) {
            let row = (sg * RT + 0u) * 16u + i / 16u;
            let col = 32u + i % 16u;
            if (row < rows && col < EV) {
                o[(head * params.l + q0 + row) * EV + col] =
                    vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);
                words_written += 1u;
            }
        }
        workgroupBarrier();
        coopStoreT(acc_0_3, &q_t[STAGE0 + sg * 256u], 16u);
        workgroupBarrier();
        for (var i = lane; i < 256u; i += SG) {
            let row = (sg * RT + 0u) * 16u + i / 16u;
            let col = 48u + i % 16u;
            if (row < rows && col < EV) {
                o[(head * params.l + q0 + row) * EV + col] =
                    vn_t[col] + vn_t[EV + col] * (q_t[STAGE0 + sg * 256u + i] * q_t[DT0 + DS + row]);
                words_written += 1u;
            }
        }
        workgroupBarrier();
    }

}
