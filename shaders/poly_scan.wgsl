// Causal poly: turns one window's chunk states into exclusive prefix states. Per unit, `partial`
// holds `states` slots of R * (Ev + 1) words; pass 1 wrote the state of key chunk c,
// sum_{j in chunk c} phi_k(k_j - mu) [v_j | 1], into slot c for c < splits. For every element i:
// running = carry[i] (all keys of earlier windows); slot c <- running (every key before chunk c);
// running += the chunk's state; finally the carry <- running (every key so far), and so does slot
// `splits` where the window has query chunks past its last key chunk (rows i >= S read it).

struct Params {
    splits: u32, // key chunks of this window (pass 1's splits)
    states: u32, // slots per unit: the window's chunks
    words: u32,  // R * (Ev + 1)
    {{LAST_PARAM}}: u32,
}

const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> carry: array<f32>;{{DECAY_DECL}}
{{IO_COUNTER_DECL}}

@compute @workgroup_size({{WG}})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = {{WORD}};
    let unit = gid.y;
    var words_read = 0u;
    var words_written = 0u;
    if (i < params.words) {
        var running = carry[unit * params.words + i];
        words_read += 1u;
        for (var sp = 0u; sp < params.splits; sp++) {
            let at = (unit * params.states + sp) * params.words + i;
            let x = partial[at];
            partial[at] = running;
{{SCAN_STEP}}
            words_read += 1u;
            words_written += 1u;
        }
        if (params.splits < params.states) {
            partial[(unit * params.states + params.splits) * params.words + i] = running;
            words_written += 1u;
        }
        carry[unit * params.words + i] = running;
        words_written += 1u;
    }
{{IO_COUNTER_ADD}}
}
