// Packs S' for the tensor-core pass 2: S'' = S' / keys in f16 (every entry is at most 1), rows
// padded to RP and columns to EVP with zeros, and the normaliser column z (f32) padded to RP.
enable f16;

const R: u32 = 2145u;
const RP: u32 = 2176u;
const EV: u32 = 64u;
const EV1: u32 = EV + 1u;
const EVP: u32 = 64u;
const WG: u32 = 128u;

@group(0) @binding(0) var<uniform> inv_keys: vec4<f32>;
@group(0) @binding(1) var<storage, read> s_prime: array<f32>;
@group(0) @binding(2) var<storage, read_write> s16: array<f16>;
@group(0) @binding(3) var<storage, read_write> z: array<f32>;


@compute @workgroup_size(128)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let unit = gid.y;
    var words_read = 0u;
    var words_written = 0u;
    if (i < RP * EVP) {
        let f = i / EVP;
        let c = i % EVP;
        var x = 0.0;
        if (f < R && c < EV) {
            x = s_prime[(unit * R + f) * EV1 + c] * inv_keys.x;
            words_read += 1u;
        }
        s16[unit * RP * EVP + i] = f16(x);
        if (c == 0u) {
            var d = 0.0;
            if (f < R) {
                d = s_prime[(unit * R + f) * EV1 + EV];
                words_read += 1u;
            }
            z[unit * RP + f] = d;
            words_written += 1u;
        }
        // Two halves make a word.
        words_written += i % 2u;
    }

}
