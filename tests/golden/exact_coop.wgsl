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

const E: u32 = 64u;
const EV: u32 = 64u;
const BQ: u32 = 128u;
const BK: u32 = 32u;
const WG: u32 = 256u;
const SG: u32 = 32u;   // subgroup size (the adapter has exactly one)
const RT: u32 = 1u;   // 16-row tiles per subgroup
const R16: u32 = 16u * RT; // query rows per subgroup
const NP: u32 = SG / R16;  // lanes per query row in the softmax
// Storage elements (vec4 where E and Ev are multiples of 4) and row widths in them.
alias T = vec4<f32>;
const LANES: u32 = 4u;
const EW: u32 = E / LANES;
const EVW: u32 = EV / LANES;
// Row strides in workgroup memory: K/Q and V rows padded to 16 columns (zeros) plus 8 halves,
// scores plus 4 floats, probabilities plus 8 halves: every row starts on 16 bytes (NVIDIA returns
// garbage for cooperative loads from other addresses) and rows fall in different banks.
const KS: u32 = 72u;
const VS: u32 = 72u;
const SS: u32 = BK + 4u;
const PS: u32 = BK + 8u;
const BUF: u32 = BK * (KS + VS); // one K tile followed by its V tile
// Lazy rescaling: the running row maximum m moves only when a tile's maximum exceeds it by more
// than TAU (log2 units); P = exp2(s - m + OFF) then lies below 2^(TAU + OFF) = 2^15 < f16's
// maximum, and OFF keeps P out of f16's subnormal range down to 2^-(14 + OFF) of the maximum.
const TAU: f32 = 4.0;
const OFF: f32 = 11.0;
// Below every real score: marks masked entries and the "no key seen yet" running maximum.
const NEG: f32 = -3.0e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<T>;
@group(0) @binding(2) var<storage, read> k: array<T>;
@group(0) @binding(3) var<storage, read> v: array<T>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;


// First the Q block (read into registers once), then two buffers of [K tile | V tile].
var<workgroup> kv_t: array<f16, 9216>;
// Per subgroup: its scores (R16 x SS), also the staging tiles of its accumulators.
var<workgroup> s_t: array<f32, 4608>;
// Per subgroup: its probabilities (R16 x PS), the A operand of P V.
var<workgroup> p_t: array<f16, 5120>;

@compute @workgroup_size(256)
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

    for (var i = lid; i < 9216u; i += WG) {
        kv_t[i] = f16(0.0);
    }
    for (var i = lid; i < 4608u; i += WG) {
        s_t[i] = 0.0;
    }
    workgroupBarrier();
    // Accumulators start from a zero tile loaded from memory: naga writes a zero-constructed
    // coop_mat as OpConstantNull, which gave garbage on NVIDIA's driver (poly passes, H100).
    let zero_acc = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb], 16u);
    for (var idx = lid; idx < BQ * EW; idx += WG) {
        let row = idx / EW;
        let c = (idx % EW) * LANES;
        var x = T();
        if (row < q_rows) {
            x = q[q_base + idx] * params.scale_log2;
            words_read += LANES;
        }
        kv_t[row * KS + c + 0u] = f16(x.x);
        kv_t[row * KS + c + 1u] = f16(x.y);
        kv_t[row * KS + c + 2u] = f16(x.z);
        kv_t[row * KS + c + 3u] = f16(x.w);
    }
    workgroupBarrier();
    let qf_0_0 = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[(row0 + 0u) * KS + 0u], KS);
    let qf_0_1 = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[(row0 + 0u) * KS + 16u], KS);
    let qf_0_2 = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[(row0 + 0u) * KS + 32u], KS);
    let qf_0_3 = coopLoadT<coop_mat16x16<f16, A>>(&kv_t[(row0 + 0u) * KS + 48u], KS);
    workgroupBarrier();
    // Q's values would sit in the padding columns of the V tiles: zero the block again.
    for (var i = lid; i < BQ * KS; i += WG) {
        kv_t[i] = f16(0.0);
    }
    var o_0_0 = zero_acc;
    var o_0_1 = zero_acc;
    var o_0_2 = zero_acc;
    var o_0_3 = zero_acc;
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
    }
    // The next K/V tile is loaded into registers (as f16) while this one is multiplied.
    var kx_0 = vec4<f16>();
    var kx_1 = vec4<f16>();
    var vx_0 = vec4<f16>();
    var vx_1 = vec4<f16>();
    if (kv_end > 0u) {
        let kr = min(BK, kv_end - (0u));
        kx_0 = vec4<f16>();
        if (lid + 0u < kr * EW) {
            kx_0 = vec4<f16>(k[k_base + (0u) * EW + lid + 0u]);
            words_read += LANES;
        }
        kx_1 = vec4<f16>();
        if (lid + 256u < kr * EW) {
            kx_1 = vec4<f16>(k[k_base + (0u) * EW + lid + 256u]);
            words_read += LANES;
        }
        vx_0 = vec4<f16>();
        if (lid + 0u < kr * EVW) {
            vx_0 = vec4<f16>(v[v_base + (0u) * EVW + lid + 0u]);
            words_read += LANES;
        }
        vx_1 = vec4<f16>();
        if (lid + 256u < kr * EVW) {
            vx_1 = vec4<f16>(v[v_base + (0u) * EVW + lid + 256u]);
            words_read += LANES;
        }
    }
    var tile = 0u;
    for (var j0 = 0u; j0 < kv_end; j0 += BK) {
        let kb = (tile % 2u) * BUF;
        let vb = kb + BK * KS;
        // The buffer written here was last read in the tile before the previous barrier.
        if (lid + 0u < BK * EW) {
            let i = lid + 0u;
            let at = kb + (i / EW) * KS + (i % EW) * LANES;
            kv_t[at + 0u] = kx_0.x;
            kv_t[at + 1u] = kx_0.y;
            kv_t[at + 2u] = kx_0.z;
            kv_t[at + 3u] = kx_0.w;
        }
        if (lid + 256u < BK * EW) {
            let i = lid + 256u;
            let at = kb + (i / EW) * KS + (i % EW) * LANES;
            kv_t[at + 0u] = kx_1.x;
            kv_t[at + 1u] = kx_1.y;
            kv_t[at + 2u] = kx_1.z;
            kv_t[at + 3u] = kx_1.w;
        }
        if (lid + 0u < BK * EVW) {
            let i = lid + 0u;
            let at = vb + (i / EVW) * VS + (i % EVW) * LANES;
            kv_t[at + 0u] = vx_0.x;
            kv_t[at + 1u] = vx_0.y;
            kv_t[at + 2u] = vx_0.z;
            kv_t[at + 3u] = vx_0.w;
        }
        if (lid + 256u < BK * EVW) {
            let i = lid + 256u;
            let at = vb + (i / EVW) * VS + (i % EVW) * LANES;
            kv_t[at + 0u] = vx_1.x;
            kv_t[at + 1u] = vx_1.y;
            kv_t[at + 2u] = vx_1.z;
            kv_t[at + 3u] = vx_1.w;
        }
        workgroupBarrier();
        if (j0 + BK < kv_end) {
            let kr = min(BK, kv_end - (j0 + BK));
            kx_0 = vec4<f16>();
            if (lid + 0u < kr * EW) {
                kx_0 = vec4<f16>(k[k_base + (j0 + BK) * EW + lid + 0u]);
                words_read += LANES;
            }
            kx_1 = vec4<f16>();
            if (lid + 256u < kr * EW) {
                kx_1 = vec4<f16>(k[k_base + (j0 + BK) * EW + lid + 256u]);
                words_read += LANES;
            }
            vx_0 = vec4<f16>();
            if (lid + 0u < kr * EVW) {
                vx_0 = vec4<f16>(v[v_base + (j0 + BK) * EVW + lid + 0u]);
                words_read += LANES;
            }
            vx_1 = vec4<f16>();
            if (lid + 256u < kr * EVW) {
                vx_1 = vec4<f16>(v[v_base + (j0 + BK) * EVW + lid + 256u]);
                words_read += LANES;
            }
        }

        // Scores of this subgroup's rows, staged in its slice of s_t.
        {
            var s_0 = zero_acc;
            let kf_0 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 0u * KS + 0u], KS);
            s_0 = coopMultiplyAdd(qf_0_0, kf_0, s_0);
            let kf_1 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 0u * KS + 16u], KS);
            s_0 = coopMultiplyAdd(qf_0_1, kf_1, s_0);
            let kf_2 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 0u * KS + 32u], KS);
            s_0 = coopMultiplyAdd(qf_0_2, kf_2, s_0);
            let kf_3 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 0u * KS + 48u], KS);
            s_0 = coopMultiplyAdd(qf_0_3, kf_3, s_0);
            coopStoreT(s_0, &s_t[sb + 0u * SS + 0u], SS);
        }
        {
            var s_0 = zero_acc;
            let kf_0 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 16u * KS + 0u], KS);
            s_0 = coopMultiplyAdd(qf_0_0, kf_0, s_0);
            let kf_1 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 16u * KS + 16u], KS);
            s_0 = coopMultiplyAdd(qf_0_1, kf_1, s_0);
            let kf_2 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 16u * KS + 32u], KS);
            s_0 = coopMultiplyAdd(qf_0_2, kf_2, s_0);
            let kf_3 = coopLoad<coop_mat16x16<f16, B>>(&kv_t[kb + 16u * KS + 48u], KS);
            s_0 = coopMultiplyAdd(qf_0_3, kf_3, s_0);
            coopStoreT(s_0, &s_t[sb + 0u * SS + 16u], SS);
        }
        subgroupBarrier();

        let lim = max(jmax, j0) - j0; // visible keys of the tile
        let c_0 = (NP * (0u + r) + part) % BK;
        let x_0 = select(NEG, s_t[sb + r * SS + c_0], c_0 < lim);
        let c_1 = (NP * (1u + r) + part) % BK;
        let x_1 = select(NEG, s_t[sb + r * SS + c_1], c_1 < lim);
        let c_2 = (NP * (2u + r) + part) % BK;
        let x_2 = select(NEG, s_t[sb + r * SS + c_2], c_2 < lim);
        let c_3 = (NP * (3u + r) + part) % BK;
        let x_3 = select(NEG, s_t[sb + r * SS + c_3], c_3 < lim);
        let c_4 = (NP * (4u + r) + part) % BK;
        let x_4 = select(NEG, s_t[sb + r * SS + c_4], c_4 < lim);
        let c_5 = (NP * (5u + r) + part) % BK;
        let x_5 = select(NEG, s_t[sb + r * SS + c_5], c_5 < lim);
        let c_6 = (NP * (6u + r) + part) % BK;
        let x_6 = select(NEG, s_t[sb + r * SS + c_6], c_6 < lim);
        let c_7 = (NP * (7u + r) + part) % BK;
        let x_7 = select(NEG, s_t[sb + r * SS + c_7], c_7 < lim);
        let c_8 = (NP * (8u + r) + part) % BK;
        let x_8 = select(NEG, s_t[sb + r * SS + c_8], c_8 < lim);
        let c_9 = (NP * (9u + r) + part) % BK;
        let x_9 = select(NEG, s_t[sb + r * SS + c_9], c_9 < lim);
        let c_10 = (NP * (10u + r) + part) % BK;
        let x_10 = select(NEG, s_t[sb + r * SS + c_10], c_10 < lim);
        let c_11 = (NP * (11u + r) + part) % BK;
        let x_11 = select(NEG, s_t[sb + r * SS + c_11], c_11 < lim);
        let c_12 = (NP * (12u + r) + part) % BK;
        let x_12 = select(NEG, s_t[sb + r * SS + c_12], c_12 < lim);
        let c_13 = (NP * (13u + r) + part) % BK;
        let x_13 = select(NEG, s_t[sb + r * SS + c_13], c_13 < lim);
        let c_14 = (NP * (14u + r) + part) % BK;
        let x_14 = select(NEG, s_t[sb + r * SS + c_14], c_14 < lim);
        let c_15 = (NP * (15u + r) + part) % BK;
        let x_15 = select(NEG, s_t[sb + r * SS + c_15], c_15 < lim);
        var mt = max(max(max(max(max(max(max(max(max(max(max(max(max(max(max(x_0, x_1), x_2), x_3), x_4), x_5), x_6), x_7), x_8), x_9), x_10), x_11), x_12), x_13), x_14), x_15);
        mt = max(mt, subgroupShuffleXor(mt, 16u));
        // A branch on subgroupAny, written as a loop that runs at most once: naga's uniformity
        // analysis (workgroup scope) rejects cooperative operations under an `if` on a subgroup
        // operation, though the condition is uniform over the subgroup, their scope.
        let grow = subgroupAny(m > NEG && mt > m + TAU);
        for (var once = grow; once; once = false) {
            let m_new = max(m, mt);
            let alpha = exp2(m - m_new);
            m = m_new;
            lsum *= alpha;
            let ar_0 = subgroupShuffle(alpha, (lane + 0u) / 16u);
            let ar_1 = subgroupShuffle(alpha, (lane + 32u) / 16u);
            let ar_2 = subgroupShuffle(alpha, (lane + 64u) / 16u);
            let ar_3 = subgroupShuffle(alpha, (lane + 96u) / 16u);
            let ar_4 = subgroupShuffle(alpha, (lane + 128u) / 16u);
            let ar_5 = subgroupShuffle(alpha, (lane + 160u) / 16u);
            let ar_6 = subgroupShuffle(alpha, (lane + 192u) / 16u);
            let ar_7 = subgroupShuffle(alpha, (lane + 224u) / 16u);
            subgroupBarrier(); // every lane has read its scores
            coopStoreT(o_0_0, &s_t[sb + 0u], 16u);
            subgroupBarrier();
            s_t[sb + lane + 0u] *= ar_0;
            s_t[sb + lane + 32u] *= ar_1;
            s_t[sb + lane + 64u] *= ar_2;
            s_t[sb + lane + 96u] *= ar_3;
            s_t[sb + lane + 128u] *= ar_4;
            s_t[sb + lane + 160u] *= ar_5;
            s_t[sb + lane + 192u] *= ar_6;
            s_t[sb + lane + 224u] *= ar_7;
            subgroupBarrier();
            o_0_0 = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb + 0u], 16u);
            subgroupBarrier();
            coopStoreT(o_0_1, &s_t[sb + 0u], 16u);
            subgroupBarrier();
            s_t[sb + lane + 0u] *= ar_0;
            s_t[sb + lane + 32u] *= ar_1;
            s_t[sb + lane + 64u] *= ar_2;
            s_t[sb + lane + 96u] *= ar_3;
            s_t[sb + lane + 128u] *= ar_4;
            s_t[sb + lane + 160u] *= ar_5;
            s_t[sb + lane + 192u] *= ar_6;
            s_t[sb + lane + 224u] *= ar_7;
            subgroupBarrier();
            o_0_1 = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb + 0u], 16u);
            subgroupBarrier();
            coopStoreT(o_0_2, &s_t[sb + 0u], 16u);
            subgroupBarrier();
            s_t[sb + lane + 0u] *= ar_0;
            s_t[sb + lane + 32u] *= ar_1;
            s_t[sb + lane + 64u] *= ar_2;
            s_t[sb + lane + 96u] *= ar_3;
            s_t[sb + lane + 128u] *= ar_4;
            s_t[sb + lane + 160u] *= ar_5;
            s_t[sb + lane + 192u] *= ar_6;
            s_t[sb + lane + 224u] *= ar_7;
            subgroupBarrier();
            o_0_2 = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb + 0u], 16u);
            subgroupBarrier();
            coopStoreT(o_0_3, &s_t[sb + 0u], 16u);
            subgroupBarrier();
            s_t[sb + lane + 0u] *= ar_0;
            s_t[sb + lane + 32u] *= ar_1;
            s_t[sb + lane + 64u] *= ar_2;
            s_t[sb + lane + 96u] *= ar_3;
            s_t[sb + lane + 128u] *= ar_4;
            s_t[sb + lane + 160u] *= ar_5;
            s_t[sb + lane + 192u] *= ar_6;
            s_t[sb + lane + 224u] *= ar_7;
            subgroupBarrier();
            o_0_3 = coopLoadT<coop_mat16x16<f32, C>>(&s_t[sb + 0u], 16u);
            subgroupBarrier();
        }
        m = select(m, mt, m == NEG); // first visible keys of the row: nothing to rescale
        // exp2(NEG - mo) = 0 masks; a row with no visible key yet has m = NEG: mo = 0 then.
        let mo = select(m - OFF, 0.0, m == NEG);
        let p_0 = f16(exp2(x_0 - mo));
        p_t[pb + r * PS + c_0] = p_0;
        lsum += f32(p_0);
        let p_1 = f16(exp2(x_1 - mo));
        p_t[pb + r * PS + c_1] = p_1;
        lsum += f32(p_1);
        let p_2 = f16(exp2(x_2 - mo));
        p_t[pb + r * PS + c_2] = p_2;
        lsum += f32(p_2);
        let p_3 = f16(exp2(x_3 - mo));
        p_t[pb + r * PS + c_3] = p_3;
        lsum += f32(p_3);
        let p_4 = f16(exp2(x_4 - mo));
        p_t[pb + r * PS + c_4] = p_4;
        lsum += f32(p_4);
        let p_5 = f16(exp2(x_5 - mo));
        p_t[pb + r * PS + c_5] = p_5;
        lsum += f32(p_5);
        let p_6 = f16(exp2(x_6 - mo));
        p_t[pb + r * PS + c_6] = p_6;
        lsum += f32(p_6);
        let p_7 = f16(exp2(x_7 - mo));
        p_t[pb + r * PS + c_7] = p_7;
        lsum += f32(p_7);
        let p_8 = f16(exp2(x_8 - mo));
        p_t[pb + r * PS + c_8] = p_8;
        lsum += f32(p_8);
        let p_9 = f16(exp2(x_9 - mo));
        p_t[pb + r * PS + c_9] = p_9;
        lsum += f32(p_9);
        let p_10 = f16(exp2(x_10 - mo));
        p_t[pb + r * PS + c_10] = p_10;
        lsum += f32(p_10);
        let p_11 = f16(exp2(x_11 - mo));
        p_t[pb + r * PS + c_11] = p_11;
        lsum += f32(p_11);
        let p_12 = f16(exp2(x_12 - mo));
        p_t[pb + r * PS + c_12] = p_12;
        lsum += f32(p_12);
        let p_13 = f16(exp2(x_13 - mo));
        p_t[pb + r * PS + c_13] = p_13;
        lsum += f32(p_13);
        let p_14 = f16(exp2(x_14 - mo));
        p_t[pb + r * PS + c_14] = p_14;
        lsum += f32(p_14);
        let p_15 = f16(exp2(x_15 - mo));
        p_t[pb + r * PS + c_15] = p_15;
        lsum += f32(p_15);
        subgroupBarrier();

        {
            let pf_0 = coopLoadT<coop_mat16x16<f16, A>>(&p_t[pb + 0u * PS + 0u], PS);
            let vf_0 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 0u * VS + 0u], VS);
            o_0_0 = coopMultiplyAdd(pf_0, vf_0, o_0_0);
            let vf_1 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 0u * VS + 16u], VS);
            o_0_1 = coopMultiplyAdd(pf_0, vf_1, o_0_1);
            let vf_2 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 0u * VS + 32u], VS);
            o_0_2 = coopMultiplyAdd(pf_0, vf_2, o_0_2);
            let vf_3 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 0u * VS + 48u], VS);
            o_0_3 = coopMultiplyAdd(pf_0, vf_3, o_0_3);
        }
        {
            let pf_0 = coopLoadT<coop_mat16x16<f16, A>>(&p_t[pb + 0u * PS + 16u], PS);
            let vf_0 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 16u * VS + 0u], VS);
            o_0_0 = coopMultiplyAdd(pf_0, vf_0, o_0_0);
            let vf_1 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 16u * VS + 16u], VS);
            o_0_1 = coopMultiplyAdd(pf_0, vf_1, o_0_1);
            let vf_2 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 16u * VS + 32u], VS);
            o_0_2 = coopMultiplyAdd(pf_0, vf_2, o_0_2);
            let vf_3 = coopLoadT<coop_mat16x16<f16, B>>(&kv_t[vb + 16u * VS + 48u], VS);
            o_0_3 = coopMultiplyAdd(pf_0, vf_3, o_0_3);
        }
        tile += 1u;
    }

    lsum += subgroupShuffleXor(lsum, 16u);
    let inv = select(0.0, 1.0 / lsum, lsum > 0.0);
    let inv_0 = subgroupShuffle(inv, (lane + 0u) / 16u);
    let inv_1 = subgroupShuffle(inv, (lane + 32u) / 16u);
    let inv_2 = subgroupShuffle(inv, (lane + 64u) / 16u);
    let inv_3 = subgroupShuffle(inv, (lane + 96u) / 16u);
    let inv_4 = subgroupShuffle(inv, (lane + 128u) / 16u);
    let inv_5 = subgroupShuffle(inv, (lane + 160u) / 16u);
    let inv_6 = subgroupShuffle(inv, (lane + 192u) / 16u);
    let inv_7 = subgroupShuffle(inv, (lane + 224u) / 16u);
    coopStoreT(o_0_0, &s_t[sb + 0u], 16u);
    subgroupBarrier();
    {
        let i = lane + 0u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_0;
            words_written += 1u;
        }
    }
    {
        let i = lane + 32u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_1;
            words_written += 1u;
        }
    }
    {
        let i = lane + 64u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_2;
            words_written += 1u;
        }
    }
    {
        let i = lane + 96u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_3;
            words_written += 1u;
        }
    }
    {
        let i = lane + 128u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_4;
            words_written += 1u;
        }
    }
    {
        let i = lane + 160u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_5;
            words_written += 1u;
        }
    }
    {
        let i = lane + 192u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_6;
            words_written += 1u;
        }
    }
    {
        let i = lane + 224u;
        let row = row0 + i / 16u;
        let col = 0u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_7;
            words_written += 1u;
        }
    }
    subgroupBarrier();
    coopStoreT(o_0_1, &s_t[sb + 0u], 16u);
    subgroupBarrier();
    {
        let i = lane + 0u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_0;
            words_written += 1u;
        }
    }
    {
        let i = lane + 32u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_1;
            words_written += 1u;
        }
    }
    {
        let i = lane + 64u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_2;
            words_written += 1u;
        }
    }
    {
        let i = lane + 96u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_3;
            words_written += 1u;
        }
    }
    {
        let i = lane + 128u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_4;
            words_written += 1u;
        }
    }
    {
        let i = lane + 160u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_5;
            words_written += 1u;
        }
    }
    {
        let i = lane + 192u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_6;
            words_written += 1u;
        }
    }
    {
        let i = lane + 224u;
        let row = row0 + i / 16u;
        let col = 16u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_7;
            words_written += 1u;
        }
    }
    subgroupBarrier();
    coopStoreT(o_0_2, &s_t[sb + 0u], 16u);
    subgroupBarrier();
    {
        let i = lane + 0u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_0;
            words_written += 1u;
        }
    }
    {
        let i = lane + 32u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_1;
            words_written += 1u;
        }
    }
    {
        let i = lane + 64u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_2;
            words_written += 1u;
        }
    }
    {
        let i = lane + 96u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_3;
            words_written += 1u;
        }
    }
    {
        let i = lane + 128u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_4;
            words_written += 1u;
        }
    }
    {
        let i = lane + 160u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_5;
            words_written += 1u;
        }
    }
    {
        let i = lane + 192u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_6;
            words_written += 1u;
        }
    }
    {
        let i = lane + 224u;
        let row = row0 + i / 16u;
        let col = 32u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_7;
            words_written += 1u;
        }
    }
    subgroupBarrier();
    coopStoreT(o_0_3, &s_t[sb + 0u], 16u);
    subgroupBarrier();
    {
        let i = lane + 0u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_0;
            words_written += 1u;
        }
    }
    {
        let i = lane + 32u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_1;
            words_written += 1u;
        }
    }
    {
        let i = lane + 64u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_2;
            words_written += 1u;
        }
    }
    {
        let i = lane + 96u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_3;
            words_written += 1u;
        }
    }
    {
        let i = lane + 128u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_4;
            words_written += 1u;
        }
    }
    {
        let i = lane + 160u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_5;
            words_written += 1u;
        }
    }
    {
        let i = lane + 192u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_6;
            words_written += 1u;
        }
    }
    {
        let i = lane + 224u;
        let row = row0 + i / 16u;
        let col = 48u + i % 16u;
        if (row < q_rows && col < EV) {
            o[(head * params.l + q0 + row) * EV + col] = s_t[sb + i] * inv_7;
            words_written += 1u;
        }
    }
    subgroupBarrier();
    if (params.write_stats != 0u && part == 0u && row0 + r < q_rows) {
        let srow = (head * params.l + q0 + row0 + r) * 2u;
        stats[srow] = m - OFF;
        stats[srow + 1u] = lsum;
        words_written += 2u;
    }

}
