// Poly pass 2: O = D^-1 Phi_q(Q) S'. A workgroup keeps a block of B query rows in workgroup memory
// and streams S' through in chunks of RC feature rows, the next chunk (and its slice of the feature
// table) loaded into registers while this one is multiplied; with a single chunk (schedule A) S' is
// loaded once and the workgroup loops over many query blocks. Thread (tr, tc) keeps its rows of the
// block's output (`micro_tile_row` in `src/poly/kernel_f32.rs`: rows 4 tr + 0..3, 4 (tr + TR) + 0..3,
// ... where it owns a multiple of 4, else tr, tr + TR, ...) for value columns 4*(tc + TC*u) + 0..3
// in named registers across all chunks. The normaliser D = Phi_q(Q) z, with z the last column of
// S', is summed by the threads that build the features.

struct Params {
    l: u32,       // query rows per head in this dispatch
    blocks: u32,  // query blocks per head
    group: u32,   // query heads per KV head
    chunks: u32,  // S' chunks; a uniform rather than a constant so drivers do not unroll the loop
    // Causal only: query rows per sequence chunk, key chunks of this window, state slots per unit.
    seq_chunk: u32,
    splits: u32,
    states: u32,
    _pad: u32,
}

const E: u32 = 64u;
const E1: u32 = E + 1u;
const QS: u32 = 68u;    // row stride of the query tile (see Pass2Tiles::q_stride)
const EV: u32 = 64u;
const EV1: u32 = EV + 1u;
const R: u32 = 2145u;
const RC: u32 = 56u;
const RESIDENT: bool = false; // one chunk: S' loaded once per workgroup
// Causal (src/kernels/poly_causal.rs): block qb reads the prefix state of its sequence chunk (one
// per block, also when resident) and adds the chunk's masked block [num | D] from `diag`.
const CAUSAL: bool = false;
const B: u32 = 64u;      // query rows per block (TR x rows per thread)
const G: u32 = 2u;
const IW: u32 = 1u;
const TR: u32 = 16u;    // thread grid TR x TC
const TC: u32 = 8u;
const CW: u32 = 16u;    // vec4 per S' tile row: EV columns padded to whole thread columns
const WG: u32 = TR * TC;
// Feature build: thread (rb, fb) builds query rows rb, rb + HB, ... (RPT of them) of chunk rows
// fb, fb + TPR, ...; one read of a feature's indices and weight serves RPT rows.
const RPT: u32 = 8u;
const HB: u32 = B / RPT;
const TPR: u32 = WG / HB;
const FS: u32 = 72u;    // row stride of the feature tile (see Pass2Tiles::feature_stride)

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s_prime: array<f32>;
@group(0) @binding(3) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(4) var<storage, read> feat_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;



var<workgroup> q_tile: array<f32, 4352>;
var<workgroup> s_tile: array<vec4<f32>, 896>; // value columns of the chunk
var<workgroup> wz_t: array<vec2<f32>, RC>;           // feature weight, normaliser column of S'
// phi[f * FS + row]; after the last chunk, the normaliser partials (fb * B + row).
var<workgroup> phi: array<vec4<f32>, 1008>;
var<workgroup> idx_t: array<u32, 112>;           // idx_t[f * G + t]: unpacked indices

fn phi_set(i: u32, x: f32) {
    phi[i / 4u][i % 4u] = x;
}

fn phi_get(i: u32) -> f32 {
    return phi[i / 4u][i % 4u];
}

fn feature_index(f: u32, t: u32) -> u32 {
    return idx_t[f * G + t];
}

// The state block `q0` reads: S' of its unit, or (causal) the prefix state of its sequence chunk,
// every key of the window's chunks before it (slot `splits`: all of the window's keys).
fn state_of(unit: u32, q0: u32) -> u32 {
    if (CAUSAL) {
        return unit * params.states + min(q0 / params.seq_chunk, params.splits);
    }
    return unit;
}

// Schedule A: all of S' with its feature table, loaded once by loops (too large for registers).
fn load_resident(unit: u32, lid: u32) -> u32 {
    var words = 0u;
    for (var i = lid; i < R * EV1; i += WG) {
        let f = i / EV1;
        let c = i % EV1;
        let x = s_prime[unit * R * EV1 + i];
        words += 1u;
        if (c < EV) {
            s_tile[f * CW + c / 4u][c % 4u] = x;
        } else {
            wz_t[f].y = x;
        }
    }
    for (var i = lid; i < R * IW; i += WG) {
        let w = feat_idx[i];
        words += 1u;
        for (var t = 3u * (i % IW); t < min(G, 3u * (i % IW) + 3u); t++) {
            idx_t[(i / IW) * G + t] = (w >> (10u * (t % 3u))) & 1023u;
        }
    }
    for (var i = lid; i < R; i += WG) {
        wz_t[i].x = feat_w[i];
        words += 1u;
    }
    return words;
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wid.y;
    let unit = head / params.group;
    let tr = lid / TC;
    let tc = lid % TC;
    let rb = lid % HB;
    let fb = lid / HB;
    var words_read = 0u;
    var words_written = 0u;
    // The padding columns of the S' tile are never loaded: zero them once.
    for (var i = lid; i < RC * CW; i += WG) {
        s_tile[i] = vec4<f32>();
    }
    workgroupBarrier();
    if (RESIDENT && !CAUSAL) {
        words_read += load_resident(unit, lid);
    }
    let si_0 = lid + 0u;
    let sf_0 = si_0 / EV1;
    let sc_0 = si_0 % EV1;
    var sx_0 = 0.0;
    let si_1 = lid + 128u;
    let sf_1 = si_1 / EV1;
    let sc_1 = si_1 % EV1;
    var sx_1 = 0.0;
    let si_2 = lid + 256u;
    let sf_2 = si_2 / EV1;
    let sc_2 = si_2 % EV1;
    var sx_2 = 0.0;
    let si_3 = lid + 384u;
    let sf_3 = si_3 / EV1;
    let sc_3 = si_3 % EV1;
    var sx_3 = 0.0;
    let si_4 = lid + 512u;
    let sf_4 = si_4 / EV1;
    let sc_4 = si_4 % EV1;
    var sx_4 = 0.0;
    let si_5 = lid + 640u;
    let sf_5 = si_5 / EV1;
    let sc_5 = si_5 % EV1;
    var sx_5 = 0.0;
    let si_6 = lid + 768u;
    let sf_6 = si_6 / EV1;
    let sc_6 = si_6 % EV1;
    var sx_6 = 0.0;
    let si_7 = lid + 896u;
    let sf_7 = si_7 / EV1;
    let sc_7 = si_7 % EV1;
    var sx_7 = 0.0;
    let si_8 = lid + 1024u;
    let sf_8 = si_8 / EV1;
    let sc_8 = si_8 % EV1;
    var sx_8 = 0.0;
    let si_9 = lid + 1152u;
    let sf_9 = si_9 / EV1;
    let sc_9 = si_9 % EV1;
    var sx_9 = 0.0;
    let si_10 = lid + 1280u;
    let sf_10 = si_10 / EV1;
    let sc_10 = si_10 % EV1;
    var sx_10 = 0.0;
    let si_11 = lid + 1408u;
    let sf_11 = si_11 / EV1;
    let sc_11 = si_11 % EV1;
    var sx_11 = 0.0;
    let si_12 = lid + 1536u;
    let sf_12 = si_12 / EV1;
    let sc_12 = si_12 % EV1;
    var sx_12 = 0.0;
    let si_13 = lid + 1664u;
    let sf_13 = si_13 / EV1;
    let sc_13 = si_13 % EV1;
    var sx_13 = 0.0;
    let si_14 = lid + 1792u;
    let sf_14 = si_14 / EV1;
    let sc_14 = si_14 % EV1;
    var sx_14 = 0.0;
    let si_15 = lid + 1920u;
    let sf_15 = si_15 / EV1;
    let sc_15 = si_15 % EV1;
    var sx_15 = 0.0;
    let si_16 = lid + 2048u;
    let sf_16 = si_16 / EV1;
    let sc_16 = si_16 % EV1;
    var sx_16 = 0.0;
    let si_17 = lid + 2176u;
    let sf_17 = si_17 / EV1;
    let sc_17 = si_17 % EV1;
    var sx_17 = 0.0;
    let si_18 = lid + 2304u;
    let sf_18 = si_18 / EV1;
    let sc_18 = si_18 % EV1;
    var sx_18 = 0.0;
    let si_19 = lid + 2432u;
    let sf_19 = si_19 / EV1;
    let sc_19 = si_19 % EV1;
    var sx_19 = 0.0;
    let si_20 = lid + 2560u;
    let sf_20 = si_20 / EV1;
    let sc_20 = si_20 % EV1;
    var sx_20 = 0.0;
    let si_21 = lid + 2688u;
    let sf_21 = si_21 / EV1;
    let sc_21 = si_21 % EV1;
    var sx_21 = 0.0;
    let si_22 = lid + 2816u;
    let sf_22 = si_22 / EV1;
    let sc_22 = si_22 % EV1;
    var sx_22 = 0.0;
    let si_23 = lid + 2944u;
    let sf_23 = si_23 / EV1;
    let sc_23 = si_23 % EV1;
    var sx_23 = 0.0;
    let si_24 = lid + 3072u;
    let sf_24 = si_24 / EV1;
    let sc_24 = si_24 % EV1;
    var sx_24 = 0.0;
    let si_25 = lid + 3200u;
    let sf_25 = si_25 / EV1;
    let sc_25 = si_25 % EV1;
    var sx_25 = 0.0;
    let si_26 = lid + 3328u;
    let sf_26 = si_26 / EV1;
    let sc_26 = si_26 % EV1;
    var sx_26 = 0.0;
    let si_27 = lid + 3456u;
    let sf_27 = si_27 / EV1;
    let sc_27 = si_27 % EV1;
    var sx_27 = 0.0;
    let si_28 = lid + 3584u;
    let sf_28 = si_28 / EV1;
    let sc_28 = si_28 % EV1;
    var sx_28 = 0.0;
        var tix_0 = 0u;
        var twz_0 = vec2<f32>();
    for (var qb = wid.x; qb < params.blocks; qb += nwg.x) {
        let q0 = qb * B;
        let rows = min(B, params.l - q0);
        let st = state_of(unit, q0);
        if (RESIDENT && CAUSAL) {
            workgroupBarrier();
            words_read += load_resident(st, lid);
        }
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
            q_tile[r * QS + c] = x;
        }
        var acc_0_0 = vec4<f32>();
        var acc_0_1 = vec4<f32>();
        var acc_1_0 = vec4<f32>();
        var acc_1_1 = vec4<f32>();
        var acc_2_0 = vec4<f32>();
        var acc_2_1 = vec4<f32>();
        var acc_3_0 = vec4<f32>();
        var acc_3_1 = vec4<f32>();
        var dq_0 = 0.0;
        var dq_1 = 0.0;
        var dq_2 = 0.0;
        var dq_3 = 0.0;
        var dq_4 = 0.0;
        var dq_5 = 0.0;
        var dq_6 = 0.0;
        var dq_7 = 0.0;
        {
            let rows_n = min(RC, R - (0u));
            sx_0 = 0.0;
            if (si_0 < RC * EV1 && sf_0 < rows_n) {
                sx_0 = s_prime[(unit * R + 0u) * EV1 + si_0];
                words_read += 1u;
            }
            sx_1 = 0.0;
            if (si_1 < RC * EV1 && sf_1 < rows_n) {
                sx_1 = s_prime[(unit * R + 0u) * EV1 + si_1];
                words_read += 1u;
            }
            sx_2 = 0.0;
            if (si_2 < RC * EV1 && sf_2 < rows_n) {
                sx_2 = s_prime[(unit * R + 0u) * EV1 + si_2];
                words_read += 1u;
            }
            sx_3 = 0.0;
            if (si_3 < RC * EV1 && sf_3 < rows_n) {
                sx_3 = s_prime[(unit * R + 0u) * EV1 + si_3];
                words_read += 1u;
            }
            sx_4 = 0.0;
            if (si_4 < RC * EV1 && sf_4 < rows_n) {
                sx_4 = s_prime[(unit * R + 0u) * EV1 + si_4];
                words_read += 1u;
            }
            sx_5 = 0.0;
            if (si_5 < RC * EV1 && sf_5 < rows_n) {
                sx_5 = s_prime[(unit * R + 0u) * EV1 + si_5];
                words_read += 1u;
            }
            sx_6 = 0.0;
            if (si_6 < RC * EV1 && sf_6 < rows_n) {
                sx_6 = s_prime[(unit * R + 0u) * EV1 + si_6];
                words_read += 1u;
            }
            sx_7 = 0.0;
            if (si_7 < RC * EV1 && sf_7 < rows_n) {
                sx_7 = s_prime[(unit * R + 0u) * EV1 + si_7];
                words_read += 1u;
            }
            sx_8 = 0.0;
            if (si_8 < RC * EV1 && sf_8 < rows_n) {
                sx_8 = s_prime[(unit * R + 0u) * EV1 + si_8];
                words_read += 1u;
            }
            sx_9 = 0.0;
            if (si_9 < RC * EV1 && sf_9 < rows_n) {
                sx_9 = s_prime[(unit * R + 0u) * EV1 + si_9];
                words_read += 1u;
            }
            sx_10 = 0.0;
            if (si_10 < RC * EV1 && sf_10 < rows_n) {
                sx_10 = s_prime[(unit * R + 0u) * EV1 + si_10];
                words_read += 1u;
            }
            sx_11 = 0.0;
            if (si_11 < RC * EV1 && sf_11 < rows_n) {
                sx_11 = s_prime[(unit * R + 0u) * EV1 + si_11];
                words_read += 1u;
            }
            sx_12 = 0.0;
            if (si_12 < RC * EV1 && sf_12 < rows_n) {
                sx_12 = s_prime[(unit * R + 0u) * EV1 + si_12];
                words_read += 1u;
            }
            sx_13 = 0.0;
            if (si_13 < RC * EV1 && sf_13 < rows_n) {
                sx_13 = s_prime[(unit * R + 0u) * EV1 + si_13];
                words_read += 1u;
            }
            sx_14 = 0.0;
            if (si_14 < RC * EV1 && sf_14 < rows_n) {
                sx_14 = s_prime[(unit * R + 0u) * EV1 + si_14];
                words_read += 1u;
            }
            sx_15 = 0.0;
            if (si_15 < RC * EV1 && sf_15 < rows_n) {
                sx_15 = s_prime[(unit * R + 0u) * EV1 + si_15];
                words_read += 1u;
            }
            sx_16 = 0.0;
            if (si_16 < RC * EV1 && sf_16 < rows_n) {
                sx_16 = s_prime[(unit * R + 0u) * EV1 + si_16];
                words_read += 1u;
            }
            sx_17 = 0.0;
            if (si_17 < RC * EV1 && sf_17 < rows_n) {
                sx_17 = s_prime[(unit * R + 0u) * EV1 + si_17];
                words_read += 1u;
            }
            sx_18 = 0.0;
            if (si_18 < RC * EV1 && sf_18 < rows_n) {
                sx_18 = s_prime[(unit * R + 0u) * EV1 + si_18];
                words_read += 1u;
            }
            sx_19 = 0.0;
            if (si_19 < RC * EV1 && sf_19 < rows_n) {
                sx_19 = s_prime[(unit * R + 0u) * EV1 + si_19];
                words_read += 1u;
            }
            sx_20 = 0.0;
            if (si_20 < RC * EV1 && sf_20 < rows_n) {
                sx_20 = s_prime[(unit * R + 0u) * EV1 + si_20];
                words_read += 1u;
            }
            sx_21 = 0.0;
            if (si_21 < RC * EV1 && sf_21 < rows_n) {
                sx_21 = s_prime[(unit * R + 0u) * EV1 + si_21];
                words_read += 1u;
            }
            sx_22 = 0.0;
            if (si_22 < RC * EV1 && sf_22 < rows_n) {
                sx_22 = s_prime[(unit * R + 0u) * EV1 + si_22];
                words_read += 1u;
            }
            sx_23 = 0.0;
            if (si_23 < RC * EV1 && sf_23 < rows_n) {
                sx_23 = s_prime[(unit * R + 0u) * EV1 + si_23];
                words_read += 1u;
            }
            sx_24 = 0.0;
            if (si_24 < RC * EV1 && sf_24 < rows_n) {
                sx_24 = s_prime[(unit * R + 0u) * EV1 + si_24];
                words_read += 1u;
            }
            sx_25 = 0.0;
            if (si_25 < RC * EV1 && sf_25 < rows_n) {
                sx_25 = s_prime[(unit * R + 0u) * EV1 + si_25];
                words_read += 1u;
            }
            sx_26 = 0.0;
            if (si_26 < RC * EV1 && sf_26 < rows_n) {
                sx_26 = s_prime[(unit * R + 0u) * EV1 + si_26];
                words_read += 1u;
            }
            sx_27 = 0.0;
            if (si_27 < RC * EV1 && sf_27 < rows_n) {
                sx_27 = s_prime[(unit * R + 0u) * EV1 + si_27];
                words_read += 1u;
            }
            sx_28 = 0.0;
            if (si_28 < RC * EV1 && sf_28 < rows_n) {
                sx_28 = s_prime[(unit * R + 0u) * EV1 + si_28];
                words_read += 1u;
            }
        }
        {
            let rows_f = min(RC, R - (0u));
            tix_0 = 0u;
            if (lid + 0u < RC * IW && (lid + 0u) / IW < rows_f) {
                tix_0 = feat_idx[(0u) * IW + lid + 0u];
                words_read += 1u;
            }
            if (lid + 0u < RC) {
                twz_0 = vec2<f32>();
                if (lid + 0u < rows_f) {
                    twz_0.x = feat_w[(0u) + lid + 0u];
                    words_read += 1u;
                }
            }
        }
        for (var ch = 0u; ch < params.chunks; ch++) {
            let f0 = ch * RC;
            if (!RESIDENT) {
                // A streamed chunk's tiles are rewritten once the previous chunk's products are
                // done; the next chunk is loaded into registers meanwhile.
                workgroupBarrier();
            }
            if (si_0 < RC * EV1) {
                if (sc_0 < EV) {
                    s_tile[sf_0 * CW + sc_0 / 4u][sc_0 % 4u] = sx_0;
                } else {
                    wz_t[sf_0].y = sx_0;
                }
            }
            if (si_1 < RC * EV1) {
                if (sc_1 < EV) {
                    s_tile[sf_1 * CW + sc_1 / 4u][sc_1 % 4u] = sx_1;
                } else {
                    wz_t[sf_1].y = sx_1;
                }
            }
            if (si_2 < RC * EV1) {
                if (sc_2 < EV) {
                    s_tile[sf_2 * CW + sc_2 / 4u][sc_2 % 4u] = sx_2;
                } else {
                    wz_t[sf_2].y = sx_2;
                }
            }
            if (si_3 < RC * EV1) {
                if (sc_3 < EV) {
                    s_tile[sf_3 * CW + sc_3 / 4u][sc_3 % 4u] = sx_3;
                } else {
                    wz_t[sf_3].y = sx_3;
                }
            }
            if (si_4 < RC * EV1) {
                if (sc_4 < EV) {
                    s_tile[sf_4 * CW + sc_4 / 4u][sc_4 % 4u] = sx_4;
                } else {
                    wz_t[sf_4].y = sx_4;
                }
            }
            if (si_5 < RC * EV1) {
                if (sc_5 < EV) {
                    s_tile[sf_5 * CW + sc_5 / 4u][sc_5 % 4u] = sx_5;
                } else {
                    wz_t[sf_5].y = sx_5;
                }
            }
            if (si_6 < RC * EV1) {
                if (sc_6 < EV) {
                    s_tile[sf_6 * CW + sc_6 / 4u][sc_6 % 4u] = sx_6;
                } else {
                    wz_t[sf_6].y = sx_6;
                }
            }
            if (si_7 < RC * EV1) {
                if (sc_7 < EV) {
                    s_tile[sf_7 * CW + sc_7 / 4u][sc_7 % 4u] = sx_7;
                } else {
                    wz_t[sf_7].y = sx_7;
                }
            }
            if (si_8 < RC * EV1) {
                if (sc_8 < EV) {
                    s_tile[sf_8 * CW + sc_8 / 4u][sc_8 % 4u] = sx_8;
                } else {
                    wz_t[sf_8].y = sx_8;
                }
            }
            if (si_9 < RC * EV1) {
                if (sc_9 < EV) {
                    s_tile[sf_9 * CW + sc_9 / 4u][sc_9 % 4u] = sx_9;
                } else {
                    wz_t[sf_9].y = sx_9;
                }
            }
            if (si_10 < RC * EV1) {
                if (sc_10 < EV) {
                    s_tile[sf_10 * CW + sc_10 / 4u][sc_10 % 4u] = sx_10;
                } else {
                    wz_t[sf_10].y = sx_10;
                }
            }
            if (si_11 < RC * EV1) {
                if (sc_11 < EV) {
                    s_tile[sf_11 * CW + sc_11 / 4u][sc_11 % 4u] = sx_11;
                } else {
                    wz_t[sf_11].y = sx_11;
                }
            }
            if (si_12 < RC * EV1) {
                if (sc_12 < EV) {
                    s_tile[sf_12 * CW + sc_12 / 4u][sc_12 % 4u] = sx_12;
                } else {
                    wz_t[sf_12].y = sx_12;
                }
            }
            if (si_13 < RC * EV1) {
                if (sc_13 < EV) {
                    s_tile[sf_13 * CW + sc_13 / 4u][sc_13 % 4u] = sx_13;
                } else {
                    wz_t[sf_13].y = sx_13;
                }
            }
            if (si_14 < RC * EV1) {
                if (sc_14 < EV) {
                    s_tile[sf_14 * CW + sc_14 / 4u][sc_14 % 4u] = sx_14;
                } else {
                    wz_t[sf_14].y = sx_14;
                }
            }
            if (si_15 < RC * EV1) {
                if (sc_15 < EV) {
                    s_tile[sf_15 * CW + sc_15 / 4u][sc_15 % 4u] = sx_15;
                } else {
                    wz_t[sf_15].y = sx_15;
                }
            }
            if (si_16 < RC * EV1) {
                if (sc_16 < EV) {
                    s_tile[sf_16 * CW + sc_16 / 4u][sc_16 % 4u] = sx_16;
                } else {
                    wz_t[sf_16].y = sx_16;
                }
            }
            if (si_17 < RC * EV1) {
                if (sc_17 < EV) {
                    s_tile[sf_17 * CW + sc_17 / 4u][sc_17 % 4u] = sx_17;
                } else {
                    wz_t[sf_17].y = sx_17;
                }
            }
            if (si_18 < RC * EV1) {
                if (sc_18 < EV) {
                    s_tile[sf_18 * CW + sc_18 / 4u][sc_18 % 4u] = sx_18;
                } else {
                    wz_t[sf_18].y = sx_18;
                }
            }
            if (si_19 < RC * EV1) {
                if (sc_19 < EV) {
                    s_tile[sf_19 * CW + sc_19 / 4u][sc_19 % 4u] = sx_19;
                } else {
                    wz_t[sf_19].y = sx_19;
                }
            }
            if (si_20 < RC * EV1) {
                if (sc_20 < EV) {
                    s_tile[sf_20 * CW + sc_20 / 4u][sc_20 % 4u] = sx_20;
                } else {
                    wz_t[sf_20].y = sx_20;
                }
            }
            if (si_21 < RC * EV1) {
                if (sc_21 < EV) {
                    s_tile[sf_21 * CW + sc_21 / 4u][sc_21 % 4u] = sx_21;
                } else {
                    wz_t[sf_21].y = sx_21;
                }
            }
            if (si_22 < RC * EV1) {
                if (sc_22 < EV) {
                    s_tile[sf_22 * CW + sc_22 / 4u][sc_22 % 4u] = sx_22;
                } else {
                    wz_t[sf_22].y = sx_22;
                }
            }
            if (si_23 < RC * EV1) {
                if (sc_23 < EV) {
                    s_tile[sf_23 * CW + sc_23 / 4u][sc_23 % 4u] = sx_23;
                } else {
                    wz_t[sf_23].y = sx_23;
                }
            }
            if (si_24 < RC * EV1) {
                if (sc_24 < EV) {
                    s_tile[sf_24 * CW + sc_24 / 4u][sc_24 % 4u] = sx_24;
                } else {
                    wz_t[sf_24].y = sx_24;
                }
            }
            if (si_25 < RC * EV1) {
                if (sc_25 < EV) {
                    s_tile[sf_25 * CW + sc_25 / 4u][sc_25 % 4u] = sx_25;
                } else {
                    wz_t[sf_25].y = sx_25;
                }
            }
            if (si_26 < RC * EV1) {
                if (sc_26 < EV) {
                    s_tile[sf_26 * CW + sc_26 / 4u][sc_26 % 4u] = sx_26;
                } else {
                    wz_t[sf_26].y = sx_26;
                }
            }
            if (si_27 < RC * EV1) {
                if (sc_27 < EV) {
                    s_tile[sf_27 * CW + sc_27 / 4u][sc_27 % 4u] = sx_27;
                } else {
                    wz_t[sf_27].y = sx_27;
                }
            }
            if (si_28 < RC * EV1) {
                if (sc_28 < EV) {
                    s_tile[sf_28 * CW + sc_28 / 4u][sc_28 % 4u] = sx_28;
                } else {
                    wz_t[sf_28].y = sx_28;
                }
            }
            if (lid + 0u < RC * IW) {
                let i = lid + 0u;
                for (var t = 3u * (i % IW); t < min(G, 3u * (i % IW) + 3u); t++) {
                    idx_t[(i / IW) * G + t] = (tix_0 >> (10u * (t % 3u))) & 1023u;
                }
            }
            if (lid + 0u < RC) {
                wz_t[lid + 0u].x = twz_0.x;
            }
            workgroupBarrier();
            if (!RESIDENT && ch + 1u < params.chunks) {
                {
                    let rows_n = min(RC, R - (f0 + RC));
                    sx_0 = 0.0;
                    if (si_0 < RC * EV1 && sf_0 < rows_n) {
                        sx_0 = s_prime[(unit * R + f0 + RC) * EV1 + si_0];
                        words_read += 1u;
                    }
                    sx_1 = 0.0;
                    if (si_1 < RC * EV1 && sf_1 < rows_n) {
                        sx_1 = s_prime[(unit * R + f0 + RC) * EV1 + si_1];
                        words_read += 1u;
                    }
                    sx_2 = 0.0;
                    if (si_2 < RC * EV1 && sf_2 < rows_n) {
                        sx_2 = s_prime[(unit * R + f0 + RC) * EV1 + si_2];
                        words_read += 1u;
                    }
                    sx_3 = 0.0;
                    if (si_3 < RC * EV1 && sf_3 < rows_n) {
                        sx_3 = s_prime[(unit * R + f0 + RC) * EV1 + si_3];
                        words_read += 1u;
                    }
                    sx_4 = 0.0;
                    if (si_4 < RC * EV1 && sf_4 < rows_n) {
                        sx_4 = s_prime[(unit * R + f0 + RC) * EV1 + si_4];
                        words_read += 1u;
                    }
                    sx_5 = 0.0;
                    if (si_5 < RC * EV1 && sf_5 < rows_n) {
                        sx_5 = s_prime[(unit * R + f0 + RC) * EV1 + si_5];
                        words_read += 1u;
                    }
                    sx_6 = 0.0;
                    if (si_6 < RC * EV1 && sf_6 < rows_n) {
                        sx_6 = s_prime[(unit * R + f0 + RC) * EV1 + si_6];
                        words_read += 1u;
                    }
                    sx_7 = 0.0;
                    if (si_7 < RC * EV1 && sf_7 < rows_n) {
                        sx_7 = s_prime[(unit * R + f0 + RC) * EV1 + si_7];
                        words_read += 1u;
                    }
                    sx_8 = 0.0;
                    if (si_8 < RC * EV1 && sf_8 < rows_n) {
                        sx_8 = s_prime[(unit * R + f0 + RC) * EV1 + si_8];
                        words_read += 1u;
                    }
                    sx_9 = 0.0;
                    if (si_9 < RC * EV1 && sf_9 < rows_n) {
                        sx_9 = s_prime[(unit * R + f0 + RC) * EV1 + si_9];
                        words_read += 1u;
                    }
                    sx_10 = 0.0;
                    if (si_10 < RC * EV1 && sf_10 < rows_n) {
                        sx_10 = s_prime[(unit * R + f0 + RC) * EV1 + si_10];
                        words_read += 1u;
                    }
                    sx_11 = 0.0;
                    if (si_11 < RC * EV1 && sf_11 < rows_n) {
                        sx_11 = s_prime[(unit * R + f0 + RC) * EV1 + si_11];
                        words_read += 1u;
                    }
                    sx_12 = 0.0;
                    if (si_12 < RC * EV1 && sf_12 < rows_n) {
                        sx_12 = s_prime[(unit * R + f0 + RC) * EV1 + si_12];
                        words_read += 1u;
                    }
                    sx_13 = 0.0;
                    if (si_13 < RC * EV1 && sf_13 < rows_n) {
                        sx_13 = s_prime[(unit * R + f0 + RC) * EV1 + si_13];
                        words_read += 1u;
                    }
                    sx_14 = 0.0;
                    if (si_14 < RC * EV1 && sf_14 < rows_n) {
                        sx_14 = s_prime[(unit * R + f0 + RC) * EV1 + si_14];
                        words_read += 1u;
                    }
                    sx_15 = 0.0;
                    if (si_15 < RC * EV1 && sf_15 < rows_n) {
                        sx_15 = s_prime[(unit * R + f0 + RC) * EV1 + si_15];
                        words_read += 1u;
                    }
                    sx_16 = 0.0;
                    if (si_16 < RC * EV1 && sf_16 < rows_n) {
                        sx_16 = s_prime[(unit * R + f0 + RC) * EV1 + si_16];
                        words_read += 1u;
                    }
                    sx_17 = 0.0;
                    if (si_17 < RC * EV1 && sf_17 < rows_n) {
                        sx_17 = s_prime[(unit * R + f0 + RC) * EV1 + si_17];
                        words_read += 1u;
                    }
                    sx_18 = 0.0;
                    if (si_18 < RC * EV1 && sf_18 < rows_n) {
                        sx_18 = s_prime[(unit * R + f0 + RC) * EV1 + si_18];
                        words_read += 1u;
                    }
                    sx_19 = 0.0;
                    if (si_19 < RC * EV1 && sf_19 < rows_n) {
                        sx_19 = s_prime[(unit * R + f0 + RC) * EV1 + si_19];
                        words_read += 1u;
                    }
                    sx_20 = 0.0;
                    if (si_20 < RC * EV1 && sf_20 < rows_n) {
                        sx_20 = s_prime[(unit * R + f0 + RC) * EV1 + si_20];
                        words_read += 1u;
                    }
                    sx_21 = 0.0;
                    if (si_21 < RC * EV1 && sf_21 < rows_n) {
                        sx_21 = s_prime[(unit * R + f0 + RC) * EV1 + si_21];
                        words_read += 1u;
                    }
                    sx_22 = 0.0;
                    if (si_22 < RC * EV1 && sf_22 < rows_n) {
                        sx_22 = s_prime[(unit * R + f0 + RC) * EV1 + si_22];
                        words_read += 1u;
                    }
                    sx_23 = 0.0;
                    if (si_23 < RC * EV1 && sf_23 < rows_n) {
                        sx_23 = s_prime[(unit * R + f0 + RC) * EV1 + si_23];
                        words_read += 1u;
                    }
                    sx_24 = 0.0;
                    if (si_24 < RC * EV1 && sf_24 < rows_n) {
                        sx_24 = s_prime[(unit * R + f0 + RC) * EV1 + si_24];
                        words_read += 1u;
                    }
                    sx_25 = 0.0;
                    if (si_25 < RC * EV1 && sf_25 < rows_n) {
                        sx_25 = s_prime[(unit * R + f0 + RC) * EV1 + si_25];
                        words_read += 1u;
                    }
                    sx_26 = 0.0;
                    if (si_26 < RC * EV1 && sf_26 < rows_n) {
                        sx_26 = s_prime[(unit * R + f0 + RC) * EV1 + si_26];
                        words_read += 1u;
                    }
                    sx_27 = 0.0;
                    if (si_27 < RC * EV1 && sf_27 < rows_n) {
                        sx_27 = s_prime[(unit * R + f0 + RC) * EV1 + si_27];
                        words_read += 1u;
                    }
                    sx_28 = 0.0;
                    if (si_28 < RC * EV1 && sf_28 < rows_n) {
                        sx_28 = s_prime[(unit * R + f0 + RC) * EV1 + si_28];
                        words_read += 1u;
                    }
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
                        if (lid + 0u < rows_f) {
                            twz_0.x = feat_w[(f0 + RC) + lid + 0u];
                            words_read += 1u;
                        }
                    }
                }
            }
            // Feature rows past R have weight 0 and a zero S' row.
            for (var f = fb; f < RC; f += TPR) {
                let wz = wz_t[f];
                let fi_0 = feature_index(f, 0u);
                let fi_1 = feature_index(f, 1u);
                let p_0 = wz.x * q_tile[(rb + 0u * HB) * QS + fi_0] * q_tile[(rb + 0u * HB) * QS + fi_1];
                dq_0 = fma(p_0, wz.y, dq_0);
                phi_set(f * FS + (rb + 0u * HB), p_0);
                let p_1 = wz.x * q_tile[(rb + 1u * HB) * QS + fi_0] * q_tile[(rb + 1u * HB) * QS + fi_1];
                dq_1 = fma(p_1, wz.y, dq_1);
                phi_set(f * FS + (rb + 1u * HB), p_1);
                let p_2 = wz.x * q_tile[(rb + 2u * HB) * QS + fi_0] * q_tile[(rb + 2u * HB) * QS + fi_1];
                dq_2 = fma(p_2, wz.y, dq_2);
                phi_set(f * FS + (rb + 2u * HB), p_2);
                let p_3 = wz.x * q_tile[(rb + 3u * HB) * QS + fi_0] * q_tile[(rb + 3u * HB) * QS + fi_1];
                dq_3 = fma(p_3, wz.y, dq_3);
                phi_set(f * FS + (rb + 3u * HB), p_3);
                let p_4 = wz.x * q_tile[(rb + 4u * HB) * QS + fi_0] * q_tile[(rb + 4u * HB) * QS + fi_1];
                dq_4 = fma(p_4, wz.y, dq_4);
                phi_set(f * FS + (rb + 4u * HB), p_4);
                let p_5 = wz.x * q_tile[(rb + 5u * HB) * QS + fi_0] * q_tile[(rb + 5u * HB) * QS + fi_1];
                dq_5 = fma(p_5, wz.y, dq_5);
                phi_set(f * FS + (rb + 5u * HB), p_5);
                let p_6 = wz.x * q_tile[(rb + 6u * HB) * QS + fi_0] * q_tile[(rb + 6u * HB) * QS + fi_1];
                dq_6 = fma(p_6, wz.y, dq_6);
                phi_set(f * FS + (rb + 6u * HB), p_6);
                let p_7 = wz.x * q_tile[(rb + 7u * HB) * QS + fi_0] * q_tile[(rb + 7u * HB) * QS + fi_1];
                dq_7 = fma(p_7, wz.y, dq_7);
                phi_set(f * FS + (rb + 7u * HB), p_7);
            }
            workgroupBarrier();
            // The product stops at the chunk's last real feature row.
            let rows_f = min(RC, R - f0);
            if (rows_f == RC) {
                for (var f = 0u; f < RC; f++) {
                    let ph_0 = phi[f * FS / 4u + tr + 0u];
                    let p_0 = ph_0.x;
                    let p_1 = ph_0.y;
                    let p_2 = ph_0.z;
                    let p_3 = ph_0.w;
                    let x_0 = s_tile[f * CW + tc + 0u];
                    let x_1 = s_tile[f * CW + tc + 8u];
                    acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                    acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                    acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                    acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                    acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                    acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                    acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                    acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                }
            } else {
                for (var f = 0u; f < rows_f; f++) {
                    let ph_0 = phi[f * FS / 4u + tr + 0u];
                    let p_0 = ph_0.x;
                    let p_1 = ph_0.y;
                    let p_2 = ph_0.z;
                    let p_3 = ph_0.w;
                    let x_0 = s_tile[f * CW + tc + 0u];
                    let x_1 = s_tile[f * CW + tc + 8u];
                    acc_0_0 = fma(vec4<f32>(p_0), x_0, acc_0_0);
                    acc_0_1 = fma(vec4<f32>(p_0), x_1, acc_0_1);
                    acc_1_0 = fma(vec4<f32>(p_1), x_0, acc_1_0);
                    acc_1_1 = fma(vec4<f32>(p_1), x_1, acc_1_1);
                    acc_2_0 = fma(vec4<f32>(p_2), x_0, acc_2_0);
                    acc_2_1 = fma(vec4<f32>(p_2), x_1, acc_2_1);
                    acc_3_0 = fma(vec4<f32>(p_3), x_0, acc_3_0);
                    acc_3_1 = fma(vec4<f32>(p_3), x_1, acc_3_1);
                }
            }
        }
        // The normaliser partials go into the feature tile once every thread is past the
        // product; the next block rewrites the tiles only after further barriers.
        workgroupBarrier();
        phi_set(fb * B + (rb + 0u * HB), dq_0);
        phi_set(fb * B + (rb + 1u * HB), dq_1);
        phi_set(fb * B + (rb + 2u * HB), dq_2);
        phi_set(fb * B + (rb + 3u * HB), dq_3);
        phi_set(fb * B + (rb + 4u * HB), dq_4);
        phi_set(fb * B + (rb + 5u * HB), dq_5);
        phi_set(fb * B + (rb + 6u * HB), dq_6);
        phi_set(fb * B + (rb + 7u * HB), dq_7);
        workgroupBarrier();
        {
            let r = (4u * (tr + 0u) + 0u);
            if (r < rows) {
                var d_0 = 0.0;
                for (var h = 0u; h < TPR; h++) {
                    d_0 += phi_get(h * B + r);
                }
                let row = (head * params.l + q0 + r) * EV;
                let c_0 = 4u * (tc + 0u);
                if (c_0 + 0u < EV) {
                    o[row + c_0 + 0u] = acc_0_0.x / d_0;
                    words_written += 1u;
                }
                if (c_0 + 1u < EV) {
                    o[row + c_0 + 1u] = acc_0_0.y / d_0;
                    words_written += 1u;
                }
                if (c_0 + 2u < EV) {
                    o[row + c_0 + 2u] = acc_0_0.z / d_0;
                    words_written += 1u;
                }
                if (c_0 + 3u < EV) {
                    o[row + c_0 + 3u] = acc_0_0.w / d_0;
                    words_written += 1u;
                }
                let c_1 = 4u * (tc + 8u);
                if (c_1 + 0u < EV) {
                    o[row + c_1 + 0u] = acc_0_1.x / d_0;
                    words_written += 1u;
                }
                if (c_1 + 1u < EV) {
                    o[row + c_1 + 1u] = acc_0_1.y / d_0;
                    words_written += 1u;
                }
                if (c_1 + 2u < EV) {
                    o[row + c_1 + 2u] = acc_0_1.z / d_0;
                    words_written += 1u;
                }
                if (c_1 + 3u < EV) {
                    o[row + c_1 + 3u] = acc_0_1.w / d_0;
                    words_written += 1u;
                }
            }
        }
        {
            let r = (4u * (tr + 0u) + 1u);
            if (r < rows) {
                var d_1 = 0.0;
                for (var h = 0u; h < TPR; h++) {
                    d_1 += phi_get(h * B + r);
                }
                let row = (head * params.l + q0 + r) * EV;
                let c_0 = 4u * (tc + 0u);
                if (c_0 + 0u < EV) {
                    o[row + c_0 + 0u] = acc_1_0.x / d_1;
                    words_written += 1u;
                }
                if (c_0 + 1u < EV) {
                    o[row + c_0 + 1u] = acc_1_0.y / d_1;
                    words_written += 1u;
                }
                if (c_0 + 2u < EV) {
                    o[row + c_0 + 2u] = acc_1_0.z / d_1;
                    words_written += 1u;
                }
                if (c_0 + 3u < EV) {
                    o[row + c_0 + 3u] = acc_1_0.w / d_1;
                    words_written += 1u;
                }
                let c_1 = 4u * (tc + 8u);
                if (c_1 + 0u < EV) {
                    o[row + c_1 + 0u] = acc_1_1.x / d_1;
                    words_written += 1u;
                }
                if (c_1 + 1u < EV) {
                    o[row + c_1 + 1u] = acc_1_1.y / d_1;
                    words_written += 1u;
                }
                if (c_1 + 2u < EV) {
                    o[row + c_1 + 2u] = acc_1_1.z / d_1;
                    words_written += 1u;
                }
                if (c_1 + 3u < EV) {
                    o[row + c_1 + 3u] = acc_1_1.w / d_1;
                    words_written += 1u;
                }
            }
        }
        {
            let r = (4u * (tr + 0u) + 2u);
            if (r < rows) {
                var d_2 = 0.0;
                for (var h = 0u; h < TPR; h++) {
                    d_2 += phi_get(h * B + r);
                }
                let row = (head * params.l + q0 + r) * EV;
                let c_0 = 4u * (tc + 0u);
                if (c_0 + 0u < EV) {
                    o[row + c_0 + 0u] = acc_2_0.x / d_2;
                    words_written += 1u;
                }
                if (c_0 + 1u < EV) {
                    o[row + c_0 + 1u] = acc_2_0.y / d_2;
                    words_written += 1u;
                }
                if (c_0 + 2u < EV) {
                    o[row + c_0 + 2u] = acc_2_0.z / d_2;
                    words_written += 1u;
                }
                if (c_0 + 3u < EV) {
                    o[row + c_0 + 3u] = acc_2_0.w / d_2;
                    words_written += 1u;
                }
                let c_1 = 4u * (tc + 8u);
                if (c_1 + 0u < EV) {
                    o[row + c_1 + 0u] = acc_2_1.x / d_2;
                    words_written += 1u;
                }
                if (c_1 + 1u < EV) {
                    o[row + c_1 + 1u] = acc_2_1.y / d_2;
                    words_written += 1u;
                }
                if (c_1 + 2u < EV) {
                    o[row + c_1 + 2u] = acc_2_1.z / d_2;
                    words_written += 1u;
                }
                if (c_1 + 3u < EV) {
                    o[row + c_1 + 3u] = acc_2_1.w / d_2;
                    words_written += 1u;
                }
            }
        }
        {
            let r = (4u * (tr + 0u) + 3u);
            if (r < rows) {
                var d_3 = 0.0;
                for (var h = 0u; h < TPR; h++) {
                    d_3 += phi_get(h * B + r);
                }
                let row = (head * params.l + q0 + r) * EV;
                let c_0 = 4u * (tc + 0u);
                if (c_0 + 0u < EV) {
                    o[row + c_0 + 0u] = acc_3_0.x / d_3;
                    words_written += 1u;
                }
                if (c_0 + 1u < EV) {
                    o[row + c_0 + 1u] = acc_3_0.y / d_3;
                    words_written += 1u;
                }
                if (c_0 + 2u < EV) {
                    o[row + c_0 + 2u] = acc_3_0.z / d_3;
                    words_written += 1u;
                }
                if (c_0 + 3u < EV) {
                    o[row + c_0 + 3u] = acc_3_0.w / d_3;
                    words_written += 1u;
                }
                let c_1 = 4u * (tc + 8u);
                if (c_1 + 0u < EV) {
                    o[row + c_1 + 0u] = acc_3_1.x / d_3;
                    words_written += 1u;
                }
                if (c_1 + 1u < EV) {
                    o[row + c_1 + 1u] = acc_3_1.y / d_3;
                    words_written += 1u;
                }
                if (c_1 + 2u < EV) {
                    o[row + c_1 + 2u] = acc_3_1.z / d_3;
                    words_written += 1u;
                }
                if (c_1 + 3u < EV) {
                    o[row + c_1 + 3u] = acc_3_1.w / d_3;
                    words_written += 1u;
                }
            }
        }
    }

}
