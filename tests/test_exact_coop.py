"""Exact attention on cooperative matrices (tensor cores): against the float64 twins, with
tolerances derived from f16 rounding (src/exact/coop.rs). Runs where the adapter has
cooperative matrices; elsewhere only the dispatch rules (which path runs, the error for
tensor_cores=True) are checked.

Tolerances, per output column c, with u = 2^-11 (f16), u32 = 2^-24, S keys, E the head dim:
- against float64 on the float32 inputs: the report's own bound (`error_bound_per_column`,
  derived from |q|, |k| and the value range) plus the float32 sums it leaves out, 3 S u32 max|v_c|
  (P V and the row sum, each term at most 2 u32 by a truncating adder, the sum 1 u32);
- against the float64 twin on f16-rounded operands (`reference.exact_attention_f16_operands`):
  only the rounding of each probability to f16 (1 + u), the GPU's exp2 (83 * 2^-23) and the f32
  dot products (2 E u32 of c |q||k|) remain, so (eps' + S 2^-36)/(1 - eps') range_c + 3 S u32
  max|v_c| with eps' = e^(ln2 * 2E u32 c max|q| max|k|) (1 + 83 * 2^-23)(1 + u) - 1. This one
  catches errors of a few 2^-11 of the value range, e.g. one key of a few hundred lost.
- f16 storage (storage="float16" on float32 inputs): the kernel reads q16, k16, v16 (the inputs
  rounded to f16) and then rounds q16 * scale * log2(e) to f16 once more. Against float64 on the
  float32 inputs: the report's bound, which covers both roundings of q (src/exact/coop.rs,
  `F16Bound`), plus the float32 sums as above. Against the f16-operand twin on the rounded
  inputs (the kernel's operands exactly): the twin tolerance above.
- f16 and f32 storage of float16 values, and the unmasked and masked key tiles, run the same
  arithmetic on the same values: equal bit for bit.
"""

from __future__ import annotations

import math

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn import reference

INFO = approx_attn.device_info()
COOP = bool(INFO["coop_f16"])
U = 2.0**-11
U32 = 2.0**-24
E_EXP = 83 * 2.0**-23

needs_coop = pytest.mark.skipif(
    not COOP,
    reason=f"{INFO['adapter']} has no 16x16 f16 cooperative matrices (device_info()['coop_f16'])",
)


@needs_coop
def test_float16_inputs_read_float16_storage_unless_float32_is_asked() -> None:
    q, k, v = (x.astype(np.float16) for x in inputs(3, 1, 2, 2, 70, 90, 64, 64))
    out32, rep32 = approx_attn.attention(
        q, k, v, method="exact", storage="float32", return_report=True
    )
    assert (rep32.tensor_cores, rep32.storage, rep32.input_rounding) == (True, "float32", None)
    out16, rep16 = approx_attn.attention(q, k, v, method="exact", return_report=True)
    assert (rep16.tensor_cores, rep16.storage) == (True, "float16"), rep16
    # The same float16 values either way: the same kernel arithmetic, bit for bit.
    np.testing.assert_array_equal(out16, out32)


def inputs(seed: int, b: int, h: int, hkv: int, L: int, S: int, E: int, Ev: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h, L, E)).astype(np.float32)
    k = rng.standard_normal((b, hkv, S, E)).astype(np.float32)
    v = rng.standard_normal((b, hkv, S, Ev)).astype(np.float32)
    return q, k, v


def f32_sums(v: np.ndarray, S: int) -> np.ndarray:
    """3 S u32 max|v_c| per value column: the float32 sums over the keys."""
    return 3 * S * U32 * np.abs(v).reshape(-1, v.shape[-1]).max(axis=0)


def twin_tolerance(q, k, v, scale: float, S: int) -> np.ndarray:
    E = q.shape[-1]
    c = abs(scale) / math.log(2.0)
    qn = float(np.sqrt((q.astype(np.float64) ** 2).sum(-1)).max())
    kn = float(np.sqrt((k.astype(np.float64) ** 2).sum(-1)).max())
    eps = (
        math.exp(math.log(2.0) * 2 * E * U32 * c * qn * kn * (1 + U) ** 2) * (1 + E_EXP) * (1 + U)
        - 1
    )
    flat = v.astype(np.float64).reshape(-1, v.shape[-1])
    rng_c = flat.max(axis=0) - flat.min(axis=0)
    return (eps + S * 2.0**-36) / (1 - eps) * rng_c + f32_sums(v, S)


CASES = [
    # (b, h, hkv, L, S, E, Ev, causal)
    (1, 2, 2, 37, 101, 16, 16, False),
    (1, 2, 2, 101, 37, 16, 16, True),
    (2, 4, 2, 130, 257, 64, 64, False),  # GQA
    (2, 4, 2, 257, 130, 64, 64, True),
    (1, 2, 1, 300, 300, 128, 128, True),
    (1, 2, 2, 77, 333, 80, 48, False),
    (1, 1, 1, 129, 129, 24, 40, True),
    (1, 2, 2, 65, 200, 256, 256, False),
    (1, 2, 2, 200, 65, 256, 256, True),
    (1, 1, 1, 50, 70, 200, 8, False),
    # Widths not multiples of 4 (f16 storage: vec2<f16> elements, odd rows padded by a half).
    (1, 2, 2, 45, 77, 33, 7, True),
    (2, 2, 1, 61, 60, 7, 9, False),
]


@needs_coop
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}h{}kv{}L{}S{}E{}Ev{}{}".format(*c[:7], "c" if c[7] else "")
)
def test_matches_float64_within_the_derived_f16_bound(case) -> None:
    b, h, hkv, L, S, E, Ev, causal = case
    q, k, v = inputs(sum(case[:7]), b, h, hkv, L, S, E, Ev)
    scale = 1.0 / math.sqrt(E)
    gqa = h != hkv
    out, rep = approx_attn.attention(
        q,
        k,
        v,
        method="exact",
        is_causal=causal,
        enable_gqa=gqa,
        tensor_cores=True,
        return_report=True,
    )
    assert rep.method == "exact" and rep.tensor_cores, rep
    assert rep.error_bound_per_column is not None and rep.f16_rounding is not None
    # The bound is informative: a few per cent of the value range at most at these sizes.
    rng_v = float(v.max() - v.min())
    assert max(rep.error_bound_per_column) < 0.1 * rng_v, rep.error_bound_per_column
    ref = reference.exact_attention(q, k, v, scale=scale, is_causal=causal, enable_gqa=gqa)
    tol = np.asarray(rep.error_bound_per_column) + f32_sums(v, S)
    assert_close(out, ref, tol, "float64")
    twin = reference.exact_attention_f16_operands(
        q, k, v, scale=scale, is_causal=causal, enable_gqa=gqa
    )
    assert_close(out, twin, twin_tolerance(q, k, v, scale, S), "f16-operand twin")


@needs_coop
def test_float16_inputs_run_tensor_cores_and_float32_inputs_do_not() -> None:
    q, k, v = inputs(5, 1, 2, 2, 96, 96, 64, 64)
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out16, rep16 = approx_attn.attention(q16, k16, v16, method="exact", return_report=True)
    assert rep16.tensor_cores and out16.dtype == np.float16
    _, rep32 = approx_attn.attention(q, k, v, method="exact", return_report=True)
    assert not rep32.tensor_cores and rep32.f16_rounding is None
    # float16 inputs are stored as f16 (half the words); float32 inputs as f32.
    assert rep16.storage == "float16" and rep32.storage == "float32"
    _, rep_off = approx_attn.attention(
        q16, k16, v16, method="exact", tensor_cores=False, return_report=True
    )
    assert not rep_off.tensor_cores
    # float16 in: the operands are already f16, so the twin on f16 operands differs from the
    # kernel only by q * scale * log2(e) rounding again (one more u on each score) and the rest.
    ref = reference.exact_attention(q16, k16, v16)
    tol = np.asarray(rep16.error_bound_per_column) + f32_sums(v16, 96)
    # float16 output: one more rounding of at most u |O| <= u max|v|.
    tol = tol + U * np.abs(v16.astype(np.float64)).max()
    assert_close(out16, ref, tol, "float16 in and out")


@needs_coop
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}h{}kv{}L{}S{}E{}Ev{}{}".format(*c[:7], "c" if c[7] else "")
)
def test_f16_storage_of_float32_inputs_within_the_derived_bound(case) -> None:
    b, h, hkv, L, S, E, Ev, causal = case
    q, k, v = inputs(sum(case[:7]) + 1, b, h, hkv, L, S, E, Ev)
    scale = 1.0 / math.sqrt(E)
    gqa = h != hkv
    out, rep = approx_attn.attention(
        q,
        k,
        v,
        method="exact",
        is_causal=causal,
        enable_gqa=gqa,
        tensor_cores=True,
        storage="float16",
        return_report=True,
    )
    assert (rep.method, rep.tensor_cores, rep.storage) == ("exact", True, "float16"), rep
    assert rep.input_rounding is not None and rep.input_rounding > 0
    # The tensor-core bound includes the input rounding (and Q's second rounding): it exceeds
    # both the f32-storage bound of the same inputs and the input rounding alone.
    _, rep32 = approx_attn.attention(
        q,
        k,
        v,
        method="exact",
        is_causal=causal,
        enable_gqa=gqa,
        tensor_cores=True,
        return_report=True,
    )
    assert rep32.storage == "float32"
    assert rep.error_bound > rep32.error_bound and rep.error_bound > rep.input_rounding
    # Q and K/V rows of E halves take ceil(E/2) words: fewer words read, fewer bytes uploaded.
    assert rep.io_reads < rep32.io_reads and rep.io_writes == rep32.io_writes
    assert rep.host_to_device_bytes < rep32.host_to_device_bytes
    ref = reference.exact_attention(q, k, v, scale=scale, is_causal=causal, enable_gqa=gqa)
    assert_close(out, ref, np.asarray(rep.error_bound_per_column) + f32_sums(v, S), "float64")
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    twin = reference.exact_attention_f16_operands(
        q16, k16, v16, scale=scale, is_causal=causal, enable_gqa=gqa
    )
    assert_close(out, twin, twin_tolerance(q16, k16, v16, scale, S), "f16-operand twin")


@needs_coop
@pytest.mark.parametrize("unmasked", ["0", "1"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}h{}kv{}L{}S{}E{}Ev{}{}".format(*c[:7], "c" if c[7] else "")
)
def test_f16_and_f32_storage_and_unmasked_tiles_agree_bit_for_bit(
    case, unmasked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    b, h, hkv, L, S, E, Ev, causal = case
    q, k, v = (x.astype(np.float16) for x in inputs(sum(case[:7]) + 2, b, h, hkv, L, S, E, Ev))
    kw = {"method": "exact", "is_causal": causal, "enable_gqa": h != hkv, "tensor_cores": True}
    monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_UNMASKED", unmasked)
    out16, rep16 = approx_attn.attention(q, k, v, return_report=True, **kw)
    assert rep16.storage == "float16" and rep16.input_rounding == 0.0, rep16
    # float32 copies of float16 values in f32 storage; unmasked tiles off there.
    monkeypatch.delenv("APPROX_ATTN_COOP_EXACT_UNMASKED")
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    out32, rep32 = approx_attn.attention(q32, k32, v32, return_report=True, **kw)
    assert rep32.storage == "float32" and rep32.plan == rep16.plan
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    # The same bound: the values are f16 already.
    assert rep16.error_bound_per_column == rep32.error_bound_per_column
    ref = reference.exact_attention(q, k, v, is_causal=causal, enable_gqa=h != hkv)
    tol = np.asarray(rep32.error_bound_per_column) + f32_sums(v32, S)
    assert_close(out32, ref, tol, "float64")


@needs_coop
def test_q_staged_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same tiles with the Q block in 1, 2 or 4 parts: the same arithmetic, bit for bit.
    q, k, v = inputs(13, 1, 4, 2, 300, 257, 64, 64)
    kw = {"method": "exact", "enable_gqa": True, "tensor_cores": True}
    monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_TILES", "8 1 16")
    for causal in (False, True):
        outs = []
        for parts in ("1", "2", "4"):
            monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_Q_PARTS", parts)
            out, rep = approx_attn.attention(q, k, v, is_causal=causal, return_report=True, **kw)
            assert f"q_parts: {parts}" in rep.plan, rep.plan
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[0], outs[2])
    # E = 128: 8 subgroups fit 48 KiB only with Q in parts; against float64 within the bound.
    q, k, v = inputs(14, 1, 2, 2, 200, 333, 128, 128)
    monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_Q_PARTS", "2")
    for causal in (False, True):
        out, rep = approx_attn.attention(q, k, v, is_causal=causal, return_report=True, **kw)
        assert "subgroups: 8" in rep.plan and "q_parts: 2" in rep.plan, rep.plan
        ref = reference.exact_attention(q, k, v, is_causal=causal)
        tol = np.asarray(rep.error_bound_per_column) + f32_sums(v, 333)
        assert_close(out, ref, tol, f"Q in parts causal={causal}")
    monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_Q_PARTS", "3")
    with pytest.raises(ValueError, match="Q_PARTS"):
        approx_attn.attention(q, k, v, **kw)


@needs_coop
def test_split_kv_dispatches_merge_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # A binding of 64 KiB holds 256 rows of 64 floats: S = 700 keys take three dispatches.
    monkeypatch.setenv("APPROX_ATTN_MAX_BINDING_BYTES", str(64 << 10))
    q, k, v = inputs(9, 1, 1, 1, 300, 700, 62, 62)
    for causal in (False, True):
        out, rep = approx_attn.attention(
            q, k, v, method="exact", is_causal=causal, tensor_cores=True, return_report=True
        )
        assert rep.dispatches > 1, rep
        ref = reference.exact_attention(q, k, v, is_causal=causal)
        tol = np.asarray(rep.error_bound_per_column) + f32_sums(v, 700)
        assert_close(out, ref, tol, f"split KV causal={causal}")
        # f16 storage and unmasked key tiles: the same plan, the same output bit for bit.
        monkeypatch.setenv("APPROX_ATTN_COOP_EXACT_UNMASKED", "1")
        q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
        kw = {"method": "exact", "is_causal": causal, "tensor_cores": True}
        o16, r16 = approx_attn.attention(q16, k16, v16, return_report=True, **kw)
        monkeypatch.delenv("APPROX_ATTN_COOP_EXACT_UNMASKED")
        o32 = approx_attn.attention(*(x.astype(np.float32) for x in (q16, k16, v16)), **kw)
        assert r16.storage == "float16" and r16.dispatches > 1
        np.testing.assert_array_equal(o16, o32.astype(np.float16))


@needs_coop
def test_large_scores_rescale_and_overflow_is_refused() -> None:
    # Scores growing along the keys make the running maximum move often (lazy rescales).
    q, k, v = inputs(11, 1, 1, 1, 64, 512, 32, 32)
    k *= np.linspace(0.1, 3.0, 512, dtype=np.float32)[:, None]
    out, rep = approx_attn.attention(q, k, v, method="exact", tensor_cores=True, return_report=True)
    ref = reference.exact_attention(q, k, v)
    assert_close(out, ref, np.asarray(rep.error_bound_per_column) + f32_sums(v, 512), "rescaled")
    with pytest.raises(ValueError, match="f16"):
        approx_attn.attention(q, k * 1e5, v, method="exact", tensor_cores=True)


@pytest.mark.skipif(COOP, reason="the adapter has cooperative matrices")
def test_without_cooperative_matrices() -> None:
    q, k, v = inputs(3, 1, 2, 2, 40, 40, 16, 16)
    with pytest.raises(NotImplementedError, match="tensor_cores=True"):
        approx_attn.attention(q, k, v, method="exact", tensor_cores=True)
    with pytest.raises(NotImplementedError, match="tensor_cores=True"):
        approx_attn.attention(q, k, v, method="exact", tensor_cores=True, storage="float16")
    # float16 inputs fall back to the f32 kernel and say so.
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    out, rep = approx_attn.attention(q16, k16, v16, method="exact", return_report=True)
    assert not rep.tensor_cores and rep.f16_rounding is None
    ref = reference.exact_attention(q16, k16, v16)
    # f32 kernel on f16-exact inputs, f16 output: float16 rounding of the output dominates.
    assert_close(out, ref, U * float(np.abs(ref).max()) + 1e-5, "f32 fallback")


def test_twin_on_f16_operands_is_close_to_float64() -> None:
    # The twin itself: it differs from float64 by the operand rounding only, within the bound the
    # kernel reports for that part (score change d <= ~2u c|q||k|, weights e^(+-d)).
    q, k, v = inputs(4, 1, 1, 1, 20, 30, 16, 16)
    a = reference.exact_attention(q, k, v, is_causal=True)
    t = reference.exact_attention_f16_operands(q, k, v, is_causal=True)
    c = 0.25 / math.log(2.0)
    qn = float(np.sqrt((q.astype(np.float64) ** 2).sum(-1)).max())
    kn = float(np.sqrt((k.astype(np.float64) ** 2).sum(-1)).max())
    d = math.log(2.0) * c * qn * kn * ((1 + U) ** 2 - 1) * 1.01
    eps = math.exp(d) - 1
    tol = eps / (1 - eps) * float(v.max() - v.min()) + U * float(np.abs(v).max())
    assert_close(t, a, tol, "twin")
    assert np.abs(t - a).max() > 0  # it does round
