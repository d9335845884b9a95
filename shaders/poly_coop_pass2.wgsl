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

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;
// Row stride of the query tile: QS = 32 / HB (mod 32) puts the HB rows and 32 / HB consecutive
// feature indices that a 32-wide subgroup reads at once into 32 different memory banks.
const QS: u32 = {{QS}}u;
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;    // feature rows per chunk, a multiple of 16
const BQ: u32 = {{BQ}}u;      // query rows per block: SUBGROUPS * RT * 16
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;
const WG: u32 = {{WG}}u;
const SG: u32 = {{SG}}u;
const RT: u32 = {{RT}}u;
const RPT: u32 = {{RPT}}u;    // query rows per feature-building thread: r, r + HB, ...
const HB: u32 = BQ / RPT;
const TPR: u32 = WG / HB;    // threads per query row group in the feature build
// After the last chunk the query tile is dead and holds the output staging tiles (one per
// subgroup, from STAGE0) and the normaliser partials (TPR per row, from DT0), then the row sums
// (from DT0 + DS).
const STAGE0: u32 = 0u;
const DT0: u32 = {{DT0}}u;
const DS: u32 = TPR * BQ;
const FS: u32 = BQ + 8u;    // row stride of the (feature-major) feature tile, in halves
const EVP: u32 = {{EVP}}u;  // value columns padded to 16: the row stride of S''
const RP: u32 = {{RP}}u;    // feature rows of S'' per unit, padded to whole chunks
const SS: u32 = EVP + 8u;   // row stride of the S'' chunk in workgroup memory, in halves

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s16: array<vec4<f16>>; // S'' rows of EVP, RP per unit
@group(0) @binding(3) var<storage, read> z: array<f32>;   // normaliser column, RP per unit
@group(0) @binding(4) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(5) var<storage, read> feat_w: array<f32>;
@group(0) @binding(6) var<storage, read> vnorm: array<f32>; // per unit: vmin, then vrange
@group(0) @binding(7) var<storage, read_write> o: array<f32>;
{{IO_COUNTER_DECL}}

// Every workgroup variable is a whole number of 16-byte units: NVIDIA's driver packs them (in an
// order of its own) and a cooperative load or store from an address that is not 16-byte aligned
// returns garbage (measured on the H100: E = 7, 9, 15 or Ev = 33 broke before the padding).
var<workgroup> zero_t: array<f32, 256>;        // initialises the accumulators
var<workgroup> phi: array<f16, {{PHI}}>;     // phi[f * FS + r]: lanes write consecutive r
var<workgroup> s_t: array<f16, {{S_TILE}}>;  // s_t[f * SS + c]: this chunk of S''
var<workgroup> q_t: array<f32, {{Q_TILE}}>;  // q_t[r * QS + c], then the tail above
var<workgroup> wz_t: array<vec2<f32>, RC>;  // the chunk's feature weights and normaliser column
var<workgroup> idx_t: array<u32, {{IDX}}>;      // idx_t[f * G + t]: unpacked feature indices
var<workgroup> vn_t: array<f32, {{VN}}>;

fn feature_index(f: u32, t: u32) -> u32 {
    return idx_t[f * G + t];
}

@compute @workgroup_size({{WG}})
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
{{D_DECL}}
{{ACC_DECL}}
{{S_LOAD_FIRST}}
{{TABLE_LOAD_FIRST}}
        for (var ch = 0u; ch < params.chunks; ch++) {
            let f0 = ch * RC;
            // The previous chunk's products are done before its tiles are overwritten.
            workgroupBarrier();
{{S_STORE}}
{{TABLE_STORE}}
            workgroupBarrier();
            if (ch + 1u < params.chunks) {
{{S_LOAD_NEXT}}
{{TABLE_LOAD_NEXT}}
            }
            // Feature rows past R have weight 0 and zero S'' rows.
            for (var f = fb; f < RC; f += TPR) {
                let wz = wz_t[f];
{{FEATURE_INDEX}}
{{FEATURE}}
            }
            workgroupBarrier();
            for (var kk = 0u; kk < RC; kk += 16u) {
{{MMA}}
            }
        }
        workgroupBarrier();
{{D_STORE}}
        workgroupBarrier();
        if (lid < BQ) {
            var z = 0.0;
            for (var h = 0u; h < TPR; h++) {
                z += q_t[DT0 + h * BQ + lid];
            }
            q_t[DT0 + DS + lid] = params.keys / z;
        }
        workgroupBarrier();
{{STORE}}
    }
{{IO_COUNTER_ADD}}
}
