// Exact attention, FlashAttention-2 style: one query tile per workgroup stays in workgroup memory
// while K/V tiles stream through it; online softmax in the log2 domain; f32 accumulation.
// `src/exact/kernel.rs` fills the double-brace slots from the plan's tiles: sizes become constants and
// the per-thread micro-tiles are unrolled into named registers.

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
const TQ: u32 = {{TQ}}u;
const TK: u32 = {{TK}}u;
const WG: u32 = {{WG}}u;
// Tiles hold elements of type T: vec4 (loads of 16 bytes) when E and Ev are multiples of 4, else
// f32. EW and EVW are the row widths of Q/K and V in elements.
alias T = {{ELEM}};
const LANES: u32 = {{LANES}}u;
const EW: u32 = E / LANES;
const EVW: u32 = EV / LANES;
// Row strides of the Q and K tiles, one element longer than a row: the threads of a warp read
// different rows, which would all start in one memory bank otherwise. P rows (elements of type
// TP: vec4 of four keys where the tiles are vec4 and BK allows): one element longer.
const QS: u32 = EW + 1u;
const KS: u32 = EW + 1u;
alias TP = {{P_ELEM}};
const PS: u32 = {{PS}}u;
// V double-buffered after K's tile (K_TILE elements, then two buffers of V_BUFFER), or in K's
// place; with EARLY_K the next K tile is loaded with this tile's V, else after the softmax.
const SPLIT_V: bool = {{SPLIT_V}};
const EARLY_K: bool = {{EARLY_K}};
const K_TILE: u32 = {{K_TILE}}u;
const V_BUFFER: u32 = {{V_BUFFER}}u;
// Below every real score: marks masked entries and the "no key seen yet" running maximum.
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> params: Params;
{{INPUT_DECL}}
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
{{IO_COUNTER_DECL}}

var<workgroup> q_tile: array<T, {{Q_TILE}}>;
var<workgroup> kv_tile: array<T, {{KV_TILE}}>;
var<workgroup> p_tile: array<TP, {{P_TILE}}>;
// part[i * TK + tk]: thread tk's partial maximum of row i's tile scores; at the end its partial
// row sum.
var<workgroup> part: array<f32, {{PART}}>;

@compute @workgroup_size({{WG}})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.y;
    let kv_head = head / params.group;
    let q0 = wid.x * BQ;
    let q_rows = min(BQ, params.l - q0);
    let tq = lid / TK;
    let tk = lid % TK;
    let q_base = (head * params.l + q0) * {{IN_EW}};
    let k_base = kv_head * params.s * {{IN_EW}};
    let v_base = kv_head * params.s * {{IN_EVW}};
    var words_read = 0u;
    var words_written = 0u;

    for (var idx = lid; idx < BQ * {{IN_EW}}; idx += WG) {
        var x = {{Q_ZERO}};
        if (idx / {{IN_EW}} < q_rows) {
            x = {{Q_READ}} * params.scale_log2;
            words_read += {{IN_WORDS}};
        }
{{Q_STORE}}
    }
    // Every thread keeps the running maximum m and its own partial sum l of its rows (the TK
    // threads of a row hold the same m), and the output accumulators.
{{O_DECL}}
    // Causal (upper-left aligned): global key j is visible to global query i iff j <= i.
    let last_q = params.q_offset + q0 + q_rows; // one past the last query row of this tile
    var kv_end = params.s;
    if (params.causal != 0u) {
        kv_end = select(0u, min(params.s, last_q - params.kv_offset), last_q > params.kv_offset);
    }
    // K and V tiles are loaded into registers while the current tile is multiplied, so their
    // global-load latency overlaps the arithmetic (exact/kernel.rs: where, per layout).
{{PREFETCH_DECL}}
    if (kv_end > 0u) {
{{LOAD_FIRST}}
    }

    for (var j0 = 0u; j0 < kv_end; j0 += BK) {
        let k_rows = min(BK, kv_end - j0);
        // Where this tile's V lives in kv_tile: after K's tile in buffer (j0 / BK) % 2 when V is
        // double-buffered, else in K's place.
        let vbase = select(0u, K_TILE + (j0 / BK) % 2u * V_BUFFER, SPLIT_V);
{{K_STORE}}
        if (SPLIT_V) {
{{V_STORE}}
        }
        workgroupBarrier();
        if (SPLIT_V) {
            // K and V of the next tile, right after the first barrier: V of tile i lives in
            // buffer i % 2, so the next tile's stores (after this tile's P V) need no barrier.
            if (j0 + BK < kv_end) {
{{NEXT_KV_LOAD}}
            }
        } else {
            // V takes K's place once every thread is past the scores: this tile's V into
            // registers now, and the next K tile too where the prefetch fits (EARLY_K).
{{V_LOAD}}
            if (EARLY_K && j0 + BK < kv_end) {
{{NEXT_K_LOAD}}
            }
        }

{{SCORES}}
        workgroupBarrier();

{{SOFTMAX}}
        if (!SPLIT_V) {
{{V_STORE}}
            if (!EARLY_K && j0 + BK < kv_end) {
{{NEXT_K_LOAD}}
            }
        }
        workgroupBarrier();

{{PV}}
        if (!SPLIT_V) {
            // The next tile's K store overwrites this tile's V.
            workgroupBarrier();
        }
    }

{{ROW_SUMS}}
    workgroupBarrier();
{{STORE}}
{{IO_COUNTER_ADD}}
}
