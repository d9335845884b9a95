// Decoding: one token of polynomial attention against a device-resident recurrent state.
// Workgroup (block, unit) owns feature rows [block * BR, block * BR + BR) of the unit's state
// (R x EV1 words, row f = sum_j exp(G_last - G_j) phi_k(k_j)_f [v_j | 1]). It forms the key's
// and the queries' features of its rows, writes dst = decay * src + phi_k(k) [v | 1] (the new
// token attends to itself), and per query head of the unit the partial dot products
// sum_{f in rows} phi_q(q)_f dst[f, c] (numerator columns and the normaliser at c = EV), which
// the reduce kernel sums over blocks. `src` and `dst` are distinct buffers, so the state before
// the step survives until the host commits it.
//
// `tok` is this token's slab: queries (UNITS * GROUP x E), keys (UNITS x E), values
// (UNITS x EV) and, where gated, one log gate per unit.

const E: u32 = {{E}}u;
const EV: u32 = {{EV}}u;
const EV1: u32 = {{EV}}u + 1u;
const R: u32 = {{R}}u;
const G: u32 = {{G}}u; // index slots per feature (the degree); index E means "1"
const UNITS: u32 = {{UNITS}}u;
const GROUP: u32 = {{GROUP}}u;
const BR: u32 = {{BR}}u;
const BLOCKS: u32 = {{BLOCKS}}u;
const WG: u32 = {{WG}}u;
const K_AT: u32 = UNITS * GROUP * E;
const V_AT: u32 = K_AT + UNITS * E;
const GATE_AT: u32 = V_AT + UNITS * EV;

@group(0) @binding(0) var<storage, read> tok: array<f32>;
@group(0) @binding(1) var<storage, read> indices: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;
@group(0) @binding(5) var<storage, read_write> partial: array<f32>;

var<workgroup> phik: array<f32, BR>;
var<workgroup> phiq: array<f32, {{PHIQ_WORDS}}>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x;
    let unit = wid.y;
    let f0 = block * BR;
    let rows = min(BR, R - f0);
    // Features of this block's rows: GROUP query heads, then the key (h = GROUP).
    for (var i = lid; i < BR * (GROUP + 1u); i += WG) {
        let f = i % BR;
        let h = i / BR;
        var x = 0.0;
        if (f < rows) {
            var base = (unit * GROUP + h) * E;
            x = weights[f0 + f];
            if (h == GROUP) {
                base = K_AT + unit * E;
                x = 1.0;
            }
            for (var t = 0u; t < G; t++) {
                let idx = indices[(f0 + f) * G + t];
                if (idx < E) {
                    x *= tok[base + idx];
                }
            }
        }
        if (h == GROUP) {
            phik[f] = x;
        } else {
            phiq[h * BR + f] = x;
        }
    }
    workgroupBarrier();
    let decay = {{DECAY}};
    for (var c = lid; c < EV1; c += WG) {
        let vc = select(1.0, tok[V_AT + unit * EV + min(c, EV - 1u)], c < EV);
        let col0 = (unit * R + f0) * EV1 + c;
{{COLUMN}}
    }
}
