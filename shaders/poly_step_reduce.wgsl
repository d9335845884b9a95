// Decoding: sums the step kernel's partial dot products over feature blocks for one query head
// (wid.y) and value column (wid.x): each thread a strided share of the blocks, then a tree in
// workgroup memory (no atomics: the sum is the same every run), the normaliser alongside; divides
// where the call normalises. Many small workgroups rather than one long loop per thread: the
// latency of a step is what counts.

const EV: u32 = {{EV}}u;
const EV1: u32 = {{EV}}u + 1u;
const BLOCKS: u32 = {{BLOCKS}}u;
const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<storage, read> partial: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

var<workgroup> nums: array<f32, WG>;
var<workgroup> dens: array<f32, WG>;

@compute @workgroup_size({{WG}})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x;
    let head = wid.y;
    let base = head * BLOCKS * EV1;
    var num = 0.0;
    var den = 0.0;
    for (var b = lid; b < BLOCKS; b += WG) {
        num += partial[base + b * EV1 + c];
        den += partial[base + b * EV1 + EV];
    }
    nums[lid] = num;
    dens[lid] = den;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if (lid < half) {
            nums[lid] += nums[lid + half];
            dens[lid] += dens[lid + half];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        num = nums[0];
        den = dens[0];
        out[head * EV + c] = {{RESULT}};
    }
}
