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
    {{LAST_PARAM}}: u32,
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;
const QS: u32 = {{QS}}u;    // row stride of the query tile (see Pass2Tiles::q_stride)
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;
const RESIDENT: bool = {{RESIDENT}}; // one chunk: S' loaded once per workgroup
// Causal (src/kernels/poly_causal.rs): block qb reads the prefix state of its sequence chunk (one
// per block, also when resident) and adds the chunk's masked block [num | D] from `diag`.
const CAUSAL: bool = {{CAUSAL}};
const B: u32 = {{B}}u;      // query rows per block (TR x rows per thread)
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;
const TR: u32 = {{TR}}u;    // thread grid TR x TC
const TC: u32 = {{TC}}u;
const CW: u32 = {{CW}}u;    // vec4 per S' tile row: EV columns padded to whole thread columns
const WG: u32 = TR * TC;
// Feature build: thread (rb, fb) builds query rows rb, rb + HB, ... (RPT of them) of chunk rows
// fb, fb + TPR, ...; one read of a feature's indices and weight serves RPT rows.
const RPT: u32 = {{RPT}}u;
const HB: u32 = B / RPT;
const TPR: u32 = WG / HB;
const FS: u32 = {{FS}}u;    // row stride of the feature tile (see Pass2Tiles::feature_stride)

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s_prime: array<f32>;
@group(0) @binding(3) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(4) var<storage, read> feat_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
{{DIAG_DECL}}
{{IO_COUNTER_DECL}}

var<workgroup> q_tile: array<f32, {{Q_TILE}}>;
var<workgroup> s_tile: array<vec4<f32>, {{S_TILE}}>; // value columns of the chunk
var<workgroup> wz_t: array<vec2<f32>, RC>;           // feature weight, normaliser column of S'
// phi[f * FS + row]; after the last chunk, the normaliser partials (fb * B + row).
var<workgroup> phi: array<{{PHI_ELEM}}, {{PHI}}>;
var<workgroup> idx_t: array<u32, {{IDX}}>;           // idx_t[f * G + t]: unpacked indices

fn phi_set(i: u32, x: f32) {
{{PHI_SET}}
}

fn phi_get(i: u32) -> f32 {
{{PHI_GET}}
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
{{PREFETCH_DECL}}
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
{{ACC_DECL}}
{{D_DECL}}
{{LOAD_FIRST}}
        for (var ch = {{FIRST_CHUNK}}; ch < params.chunks; ch++) {
            let f0 = ch * RC;
            if (!RESIDENT) {
                // A streamed chunk's tiles are rewritten once the previous chunk's products are
                // done; the next chunk is loaded into registers meanwhile.
                workgroupBarrier();
            }
{{CHUNK_STORE}}
            workgroupBarrier();
            if (!RESIDENT && ch + 1u < params.chunks) {
{{LOAD_NEXT}}
            }
            // Feature rows past R have weight 0 and a zero S' row.
            for (var f = fb; f < RC; f += TPR) {
                let wz = wz_t[f];
{{FEATURE_INDEX}}
{{FEATURE}}
            }
            workgroupBarrier();
            // The product stops at the chunk's last real feature row.
            let rows_f = min(RC, R - f0);
            if (rows_f == RC) {
{{PRODUCT_FULL}}
            } else {
                for (var f = 0u; f < rows_f; f++) {
{{PRODUCT}}
                }
            }
        }
        // The normaliser partials go into the feature tile once every thread is past the
        // product; the next block rewrites the tiles only after further barriers.
        workgroupBarrier();
{{D_STORE}}
        workgroupBarrier();
{{STORE}}
    }
{{IO_COUNTER_ADD}}
}
