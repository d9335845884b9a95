// Decoding: sums the step kernel's partial dot products over feature blocks, in block order
// (no atomics: the sum is the same every run), per query head (workgroup) and value column, and
// divides by the normaliser where the call normalises.

const EV: u32 = {{EV}}u;
const EV1: u32 = {{EV}}u + 1u;
const BLOCKS: u32 = {{BLOCKS}}u;
const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<storage, read> partial: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let head = wid.x;
    let base = head * BLOCKS * EV1;
    for (var c = lid; c < EV; c += WG) {
        var num = 0.0;
        var den = 0.0;
        for (var b = 0u; b < BLOCKS; b++) {
            num += partial[base + b * EV1 + c];
            den += partial[base + b * EV1 + EV];
        }
        out[head * EV + c] = {{RESULT}};
    }
}
