// Poly pass 2: O = D^-1 Phi_q(Q) S'. A workgroup keeps a block of B query rows (and their
// accumulators) in workgroup memory and streams S' through in chunks of RC feature rows; with a
// single chunk (schedule A) S' is loaded once and the workgroup loops over many query blocks.

struct Params {
    l: u32,       // query rows per head in this dispatch
    blocks: u32,  // query blocks per head
    group: u32,   // query heads per KV head
    chunks: u32,  // S' chunks; a uniform rather than a constant so drivers do not unroll the loop
}

const E: u32 = {{E}}u;
const E1: u32 = E + 1u;
const EV: u32 = {{EV}}u;
const EV1: u32 = EV + 1u;
const R: u32 = {{R}}u;
const RC: u32 = {{RC}}u;
const RESIDENT: bool = {{RESIDENT}}; // one chunk: S' loaded once per workgroup
const B: u32 = {{B}}u;
const G: u32 = {{G}}u;
const IW: u32 = {{IW}}u;
const WG: u32 = {{WG}}u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> s_prime: array<f32>;
@group(0) @binding(3) var<storage, read> feat_idx: array<u32>;
@group(0) @binding(4) var<storage, read> feat_w: array<f32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
{{IO_COUNTER_DECL}}

var<workgroup> q_tile: array<f32, {{Q_TILE}}>;
var<workgroup> s_tile: array<f32, {{S_TILE}}>;
var<workgroup> phi: array<f32, {{PHI}}>;
var<workgroup> idx_t: array<u32, {{IDX}}>;
var<workgroup> w_t: array<f32, RC>;
var<workgroup> o_acc: array<f32, {{O_ACC}}>;

fn feature_index(f: u32, t: u32) -> u32 {
    return (idx_t[f * IW + t / 3u] >> (10u * (t % 3u))) & 1023u;
}

// Loads feature rows f0.. of S' with their index words and weights; rows past R become zero.
fn load_chunk(unit: u32, f0: u32, lid: u32) -> u32 {
    var words = 0u;
    let rows_f = min(RC, R - f0);
    for (var i = lid; i < RC * EV1; i += WG) {
        var x = 0.0;
        if (i / EV1 < rows_f) {
            x = s_prime[(unit * R + f0) * EV1 + i];
            words += 1u;
        }
        s_tile[i] = x;
    }
    for (var i = lid; i < RC * IW; i += WG) {
        var w = 0u;
        if (i / IW < rows_f) {
            w = feat_idx[f0 * IW + i];
            words += 1u;
        }
        idx_t[i] = w;
    }
    for (var i = lid; i < RC; i += WG) {
        var w = 0.0;
        if (i < rows_f) {
            w = feat_w[f0 + i];
            words += 1u;
        }
        w_t[i] = w;
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
    var words_read = 0u;
    var words_written = 0u;
    if (RESIDENT) {
        words_read += load_chunk(unit, 0u, lid);
    }
    for (var qb = wid.x; qb < params.blocks; qb += nwg.x) {
        let q0 = qb * B;
        let rows = min(B, params.l - q0);
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
            q_tile[i] = x;
        }
        for (var i = lid; i < B * EV1; i += WG) {
            o_acc[i] = 0.0;
        }
        for (var ch = 0u; ch < params.chunks; ch++) {
            if (!RESIDENT) {
                workgroupBarrier();
                words_read += load_chunk(unit, ch * RC, lid);
            }
            workgroupBarrier();
            for (var i = lid; i < B * RC; i += WG) {
                let r = i / RC;
                let f = i % RC;
                var p = w_t[f];
                for (var t = 0u; t < G; t++) {
                    p *= q_tile[r * E1 + feature_index(f, t)];
                }
                phi[i] = p;
            }
            workgroupBarrier();
            for (var i = lid; i < B * EV1; i += WG) {
                let r = i / EV1;
                let c = i % EV1;
                var a = o_acc[i];
                for (var f = 0u; f < RC; f++) {
                    a = fma(phi[r * RC + f], s_tile[f * EV1 + c], a);
                }
                o_acc[i] = a;
            }
        }
        workgroupBarrier();
        for (var i = lid; i < B * EV; i += WG) {
            let r = i / EV;
            let c = i % EV;
            if (r < rows) {
                o[(head * params.l + q0 + r) * EV + c] = o_acc[r * EV1 + c] / o_acc[r * EV1 + EV];
                words_written += 1u;
            }
        }
        workgroupBarrier();
    }
{{IO_COUNTER_ADD}}
}
