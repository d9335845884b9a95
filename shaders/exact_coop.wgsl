// Exact attention on cooperative matrices (tensor cores): S = Q K^T and O += P V on 16 x 16 x 16
// tiles with f16 operands and f32 accumulators, online softmax in f32 (log2 domain), one query
// block of BQ rows per workgroup while K/V tiles of BK keys stream through workgroup memory.
// Subgroup s owns the query rows 16 * (s * RT + a) + 0..15 (a < RT): its Q fragments stay in
// registers, its scores and probabilities go through its own slices of s_t and p_t, so only the
// K/V tile needs the whole workgroup to synchronise (once per tile: two K/V buffers).
// `src/exact/coop.rs` fills the slots and unrolls the per-subgroup tiles into named
// registers; it also explains the rescaling schedule (lazy, threshold TAU).
enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    l: u32,           // query rows in this dispatch
    s: u32,           // key rows in this dispatch
    group: u32,       // query heads per KV head
    causal: u32,
    q_offset: u32,    // global index of this dispatch's first query row (causal mask)
    kv_offset: u32,   // global index of this dispatch's first key row
    write_stats: u32, // 1 when the keys are split over dispatches: store (m, l) per row
    scale_log2: f32,  // scale * log2(e): scores go straight to exp2
}

const E: u32 = {{E}}u;
const EV: u32 = {{EV}}u;
const BQ: u32 = {{BQ}}u;
const BK: u32 = {{BK}}u;
const WG: u32 = {{WG}}u;
const SG: u32 = {{SG}}u;   // subgroup size (the adapter has exactly one)
const RT: u32 = {{RT}}u;   // 16-row tiles per subgroup
const R16: u32 = 16u * RT; // query rows per subgroup
const NP: u32 = SG / R16;  // lanes per query row in the softmax
{{STORAGE_NOTE}}
alias T = {{ELEM}};
const LANES: u32 = {{LANES}}u;
const EW: u32 = {{EW}};
const EVW: u32 = {{EVW}};
// Row strides in workgroup memory: K/Q and V rows padded to 16 columns (zeros) plus 8 halves,
// scores plus 4 floats, probabilities plus 8 halves: every row starts on 16 bytes (NVIDIA returns
// garbage for cooperative loads from other addresses) and rows fall in different banks.
const KS: u32 = {{KS}}u;
const VS: u32 = {{VS}}u;
const SS: u32 = BK + 4u;
const PS: u32 = BK + 8u;
const BUF: u32 = BK * (KS + VS); // one K tile followed by its V tile
// Lazy rescaling: the running row maximum m moves only when a tile's maximum exceeds it by more
// than TAU (log2 units); P = exp2(s - m + OFF) then lies below 2^(TAU + OFF) = 2^15 < f16's
// maximum, and OFF keeps P out of f16's subnormal range down to 2^-(14 + OFF) of the maximum.
const TAU: f32 = {{TAU}};
const OFF: f32 = {{OFF}};
// Below every real score: marks masked entries and the "no key seen yet" running maximum.
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
{{IO_COUNTER_DECL}}

// First the Q block (read into registers once), then two buffers of [K tile | V tile].
var<workgroup> kv_t: array<f16, {{KV_T}}>;
// Per subgroup: its scores (R16 x SS), also the staging tiles of its accumulators.
var<workgroup> s_t: array<f32, {{S_T}}>;
// Per subgroup: its probabilities (R16 x PS), the A operand of P V.
var<workgroup> p_t: array<f16, {{P_T}}>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let head = wid.y;
    let kv_head = head / params.group;
    // Causal blocks differ in work: the longest (last) ones are dispatched first.
    let qb = select(wid.x, nwg.x - 1u - wid.x, params.causal != 0u);
    let q0 = qb * BQ;
    let q_rows = min(BQ, params.l - q0);
    let q_base = (head * params.l + q0) * EW;
    let k_base = kv_head * params.s * EW;
    let v_base = kv_head * params.s * EVW;
    let row0 = sg * R16;  // this subgroup's first row in the block
    let sb = row0 * SS;   // its slice of s_t
    let pb = row0 * PS;   // its slice of p_t
    let r = lane % R16;   // the row this lane works on in the softmax
    let part = lane / R16;
    var words_read = 0u;
    var words_written = 0u;

    for (var i = lid; i < {{KV_T}}u; i += WG) {
        kv_t[i] = f16(0.0);
    }
    for (var i = lid; i < {{S_T}}u; i += WG) {
        s_t[i] = 0.0;
    }
    workgroupBarrier();
    // Accumulators start from a zero tile loaded from memory: naga writes a zero-constructed
    // coop_mat as OpConstantNull, which gave garbage on NVIDIA's driver (poly passes, H100).
    let zero_acc = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb], 16u);
{{Q_BLOCK}}
    // Q's values would sit in the padding columns of the V tiles: zero the block again.
    for (var i = lid; i < {{Q_HALVES}}; i += WG) {
        kv_t[i] = f16(0.0);
    }
{{O_DECL}}
    // Running maximum (log2 units, shared by the NP lanes of row r) and this lane's partial sum.
    var m = NEG;
    var lsum = 0.0;
    // Causal (upper-left aligned): global key j is visible to global query i iff j <= i.
    let last_q = params.q_offset + q0 + q_rows; // one past the last query row of this block
    var kv_end = params.s;
    if (params.causal != 0u) {
        kv_end = select(0u, min(params.s, last_q - params.kv_offset), last_q > params.kv_offset);
    }
    // Keys of this dispatch visible to row r: j < jmax.
    var jmax = kv_end;
    if (params.causal != 0u) {
        let gi = params.q_offset + q0 + row0 + r;
        jmax = min(kv_end, max(gi + 1u, params.kv_offset) - params.kv_offset);
    }{{JFULL}}
    // The next K/V tile is loaded into registers (as f16) while this one is multiplied.
{{PREFETCH_DECL}}
    if (kv_end > 0u) {
        let kr = min(BK, kv_end - (0u));
{{LOAD_FIRST}}
    }
    var tile = 0u;
    for (var j0 = 0u; j0 < kv_end; j0 += BK) {
        let kb = (tile % 2u) * BUF;
        let vb = kb + BK * KS;
        // The buffer written here was last read in the tile before the previous barrier.
{{TILE_STORE}}
        workgroupBarrier();
        if (j0 + BK < kv_end) {
            let kr = min(BK, kv_end - (j0 + BK));
{{LOAD_NEXT}}
        }

        // Scores of this subgroup's rows, staged in its slice of s_t.
{{SCORES}}
        subgroupBarrier();

        let lim = max(jmax, j0) - j0; // visible keys of the tile
{{READ_SCORES}}
{{ROW_MAX}}
        // A branch on subgroupAny, written as a loop that runs at most once: naga's uniformity
        // analysis (workgroup scope) rejects cooperative operations under an `if` on a subgroup
        // operation, though the condition is uniform over the subgroup, their scope.
        let grow = subgroupAny(m > NEG && mt > m + TAU);
        for (var once = grow; once; once = false) {
            let m_new = max(m, mt);
            let alpha = exp2(m - m_new);
            m = m_new;
            lsum *= alpha;
{{ALPHA_ROWS}}
            subgroupBarrier(); // every lane has read its scores
{{RESCALE}}
        }
        m = select(m, mt, m == NEG); // first visible keys of the row: nothing to rescale
        // exp2(NEG - mo) = 0 masks; a row with no visible key yet has m = NEG: mo = 0 then.
        let mo = select(m - OFF, 0.0, m == NEG);
{{PROBS}}
        subgroupBarrier();

{{PV}}
        tile += 1u;
    }

{{ROW_INV}}
{{STORE_TILES}}
    if (params.write_stats != 0u && part == 0u && row0 + r < q_rows) {
        let srow = (head * params.l + q0 + row0 + r) * 2u;
        stats[srow] = m - OFF;
        stats[srow + 1u] = lsum;
        words_written += 2u;
    }
{{IO_COUNTER_ADD}}
}
