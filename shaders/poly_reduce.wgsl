// Sums the partial S' of the key splits: S'[unit] (+)= sum_split partial[unit, split].

struct Params {
    splits: u32,
    accumulate: u32, // add to S' from an earlier key chunk instead of overwriting it
    words: u32,      // R * (Ev + 1) per unit
    {{LAST_PARAM}}: u32,
}

const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partial: array<f32>;
@group(0) @binding(2) var<storage, read_write> s_prime: array<f32>;
{{IO_COUNTER_DECL}}

@compute @workgroup_size({{WG}})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = {{WORD}};
    let unit = gid.y;
    var words_read = 0u;
    var words_written = 0u;
    if (i < params.words) {
        var a = 0.0;
        if (params.accumulate != 0u) {
            a = s_prime[unit * params.words + i];
            words_read += 1u;
        }
        for (var sp = 0u; sp < params.splits; sp++) {
            a += partial[(unit * params.splits + sp) * params.words + i];
            words_read += 1u;
        }
        s_prime[unit * params.words + i] = a;
        words_written += 1u;
    }
{{IO_COUNTER_ADD}}
}
