"""float16 storage of the exact kernel's inputs against the float64 twin `reference.exact_attention`.

float16 inputs are read by the f32 exact kernel from float16 storage (two halves a word,
unpacked exactly to float32; no shader-f16 feature needed, so this runs on GL too); accumulation
and the softmax stay float32 and the output is float16, as in SDPA.

Tolerances:
  * The kernel's arithmetic is the f32 kernel's on the same values (unpacking an f16 is exact),
    so against float64 on the float16 inputs it is tol32 of tests/test_exact.py:
    u32 range(V) (8 + 2 smax + sqrt(E)), u32 = 2^-24, smax = max |scale q.k|.
  * The float16 output rounds once more: 2^-11 |ref| + 2^-25 (half an ulp; the second term for
    subnormals), on top of tol32 (applied to |ref| + tol32).
  * float32 inputs stored as float16 (storage="float16"): the rounding of the inputs moves the
    result by at most Report.input_rounding (scores by about 2 * 2^-11 |scale| |q||k|, each
    weight by a factor e^(+-that), values by 2^-11 |v|; src/exact/storage.rs), plus tol32 of the
    kernel on the rounded values.
  * f16 and f32 storage of the same values run the same arithmetic on the same tiles: their
    outputs are equal bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import approx_attn
import numpy as np
import pytest
from _helpers import assert_close
from approx_attn.reference import exact_attention

# The f32 kernel (on adapters with cooperative matrices float16 inputs would otherwise run exact
# on tensor cores; tests/test_exact_coop.py tests f16 storage there).
attention = functools.partial(approx_attn.attention, method="exact", tensor_cores=False)

U32 = 2.0**-24
U16 = 2.0**-11
F16_SUBNORMAL_HALF_SPACING = 2.0**-25


def expand_kv(q: np.ndarray, kv: np.ndarray) -> np.ndarray:
    if kv.ndim >= 3 and kv.shape[-3] != q.shape[-3]:
        kv = np.repeat(kv, q.shape[-3] // kv.shape[-3], axis=-3)
    return kv


def tolerance32(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None) -> float:
    """u32 range(V) (8 + 2 smax + sqrt(E)) on the values the kernel reads."""
    e = q.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    q64 = np.asarray(q, dtype=np.float64)
    k64 = expand_kv(q64, np.asarray(k, dtype=np.float64))
    smax = float(np.abs(np.matmul(q64, np.swapaxes(k64, -1, -2))).max()) * abs(scale)
    v64 = np.asarray(v, dtype=np.float64)
    return U32 * float(v64.max() - v64.min()) * (8.0 + 2.0 * smax + math.sqrt(e))


def f16_output_tolerance(ref: np.ndarray, tol32: float) -> np.ndarray:
    return tol32 + U16 * (np.abs(ref) + tol32) + F16_SUBNORMAL_HALF_SPACING


def f16_inputs(
    seed: int, lead_q: tuple[int, ...], lead_kv: tuple[int, ...], L: int, S: int, E: int, Ev: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead_q + (L, E)).astype(np.float16)
    k = rng.standard_normal(lead_kv + (S, E)).astype(np.float16)
    v = rng.standard_normal(lead_kv + (S, Ev)).astype(np.float16)
    return q, k, v


# (lead_q, lead_kv, L, S, E, Ev, causal): head dims 16..256 (odd ones like 3, 5, 24, 80 too), L
# != S, odd lengths, grouped-query heads.
CASES = [
    ((2,), (2,), 64, 64, 16, 16, False),
    ((1, 3), (1, 3), 77, 131, 24, 24, True),
    ((2, 4), (2, 2), 130, 61, 64, 64, False),
    ((4,), (4,), 33, 200, 80, 80, True),
    ((1, 2), (1, 1), 65, 65, 128, 128, True),
    ((2,), (2,), 47, 29, 256, 256, False),
    ((1,), (1,), 19, 257, 256, 256, True),
    ((3,), (3,), 51, 40, 3, 5, True),
    ((2,), (2,), 9, 17, 64, 5, False),
    ((1,), (1,), 1, 1, 16, 16, False),
]


def case_id(c: tuple[Any, ...]) -> str:
    lead_q, lead_kv, L, S, E, Ev, causal = c
    gqa = "-gqa" if lead_q != lead_kv else ""
    return f"L{L}-S{S}-E{E}-Ev{Ev}{'-causal' if causal else ''}{gqa}"


@pytest.mark.needs_feature("f16_storage")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float16_inputs_run_f16_storage_against_float64(case: tuple[Any, ...]) -> None:
    lead_q, lead_kv, L, S, E, Ev, causal = case
    q, k, v = f16_inputs(L * 7 + E, lead_q, lead_kv, L, S, E, Ev)
    gqa = lead_q != lead_kv
    out, rep = attention(q, k, v, is_causal=causal, enable_gqa=gqa, return_report=True)
    assert out.dtype == np.float16 and out.shape == lead_q + (L, Ev)
    assert (rep.storage, rep.unit_roundoff, rep.tensor_cores) == ("float16", U16, False)
    assert rep.input_rounding == 0.0  # float16 inputs are stored as they are
    ref = exact_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    tol = f16_output_tolerance(ref, tolerance32(q, k, v, None))
    assert_close(out, ref, tol, case_id(case))


@pytest.mark.needs_feature("f16_storage")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_f16_and_f32_storage_of_the_same_values_agree_bit_for_bit(case: tuple[Any, ...]) -> None:
    lead_q, lead_kv, L, S, E, Ev, causal = case
    q, k, v = f16_inputs(L + 3 * E, lead_q, lead_kv, L, S, E, Ev)
    gqa = lead_q != lead_kv
    # float32 copies of float16 values: f16 storage holds them exactly, and the float32 output
    # shows the kernels' results before any output rounding.
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    kw: dict[str, Any] = {"is_causal": causal, "enable_gqa": gqa, "return_report": True}
    o16, r16 = attention(q32, k32, v32, storage="float16", **kw)
    o32, r32 = attention(q32, k32, v32, storage="float32", **kw)
    assert (r16.storage, r32.storage) == ("float16", "float32")
    assert o16.dtype == np.float32 and r16.plan == r32.plan
    np.testing.assert_array_equal(o16, o32)
    # float16 in, float16 out, either storage.
    h16 = attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    h32 = attention(q, k, v, is_causal=causal, enable_gqa=gqa, storage="float32")
    np.testing.assert_array_equal(h16, h32)
    np.testing.assert_array_equal(h16, o32.astype(np.float16))


@pytest.mark.needs_feature("f16_storage")
@pytest.mark.parametrize("binding", [None, "8192"], ids=["one-dispatch", "split-queries-and-keys"])
@pytest.mark.parametrize("shape", [(64, 64, False), (24, 80, True), (3, 5, False)])
def test_counted_words_equal_the_model_and_halve_the_input_reads(
    shape: tuple[int, int, bool], binding: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    E, Ev, causal = shape
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    if binding is not None:  # several dispatches, split keys merged on the host
        monkeypatch.setenv("APPROX_ATTN_MAX_BINDING_BYTES", binding)
    B, H, L, S = 2, 3, 150, 170
    q, k, v = f16_inputs(5, (B, H), (B, H), L, S, E, Ev)
    out, r16 = attention(q, k, v, is_causal=causal, return_report=True)
    _, r32 = attention(q, k, v, is_causal=causal, return_report=True, storage="float32")
    assert r16.storage == "float16" and r32.storage == "float32"
    if binding is not None:
        assert r16.dispatches > 1, r16.plan
    # The shaders' own counts equal the model's, for both storages.
    assert r16.io_words_counted == r16.io_words
    assert r32.io_words_counted == r32.io_words
    kw: dict[str, Any] = {"method": "exact", "is_causal": causal, "heads": B * H}
    if binding is None:
        m16 = approx_attn.io_cost(L, S, E, Ev, storage="float16", **kw)
        m32 = approx_attn.io_cost(L, S, E, Ev, storage="float32", **kw)
        assert (m16["reads"], m16["writes"]) == (r16.io_reads, r16.io_writes)
        assert (m32["reads"], m32["writes"]) == (r32.io_reads, r32.io_writes)
        assert m16["storage"] == "float16"
    # Outputs are float32 words either way; inputs: a row of E halves is ceil(E / 2) words.
    assert r16.io_writes == r32.io_writes
    if E % 2 == 0 and Ev % 2 == 0:
        assert 2 * r16.io_reads == r32.io_reads
    else:
        assert r32.io_reads / 2 < r16.io_reads < r32.io_reads
    ref = exact_attention(q, k, v, is_causal=causal)
    assert_close(out, ref, f16_output_tolerance(ref, tolerance32(q, k, v, None)), "counted run")


@pytest.mark.needs_feature("f16_storage")
@pytest.mark.parametrize("causal", [False, True])
def test_float32_inputs_stored_as_float16_within_the_reported_bound(causal: bool) -> None:
    rng = np.random.default_rng(11)
    L, S, E, Ev = 90, 111, 64, 48
    q = rng.standard_normal((2, L, E), dtype=np.float32)
    k = rng.standard_normal((2, S, E), dtype=np.float32)
    v = rng.standard_normal((2, S, Ev), dtype=np.float32)
    out, rep = attention(q, k, v, is_causal=causal, storage="float16", return_report=True)
    assert out.dtype == np.float32 and rep.storage == "float16"
    assert rep.input_rounding is not None and rep.input_rounding > 0.0
    # The kernel on the rounded values, bit for bit, and the float64 result on the originals
    # within input_rounding + tol32 of the rounded values.
    q16, k16, v16 = (x.astype(np.float16) for x in (q, k, v))
    on_rounded = attention(
        q16.astype(np.float32), k16.astype(np.float32), v16.astype(np.float32), is_causal=causal
    )
    np.testing.assert_array_equal(out, on_rounded)
    ref = exact_attention(q, k, v, is_causal=causal)
    tol = rep.input_rounding + tolerance32(q16, k16, v16, None)
    assert_close(out, ref, tol, "storage='float16' on float32 inputs")
    # The rounding is visible (the bound is not met by the float32 path's error alone).
    err = float(np.abs(out - ref).max())
    assert err > 10 * tolerance32(q, k, v, None), err


def test_storage_float16_refuses_values_beyond_its_range() -> None:
    q = np.ones((1, 4, 8), dtype=np.float32)
    v = q.copy()
    v[0, 1, 2] = 70000.0
    with pytest.raises(ValueError, match="beyond float16's range"):
        attention(q, q, v, storage="float16")
    out = attention(q, q, v, storage="float32")  # float32 storage holds it
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    ("storage", "exc", "match"),
    [
        ("bfloat16", ValueError, "storage must be"),
        ("float64", ValueError, "storage must be"),
        (np.float64, ValueError, "storage must be"),
        (3, TypeError, "storage must be"),
    ],
)
def test_bad_storage(storage: Any, exc: type[Exception], match: str) -> None:
    q = np.ones((1, 4, 8), dtype=np.float16)
    with pytest.raises(exc, match=match):
        attention(q, q, q, storage=storage)


@pytest.mark.needs_feature("f16_storage")
def test_storage_accepts_numpy_dtypes_and_refuses_float16_for_poly() -> None:
    q = np.ones((1, 4, 8), dtype=np.float32)
    _, rep = attention(q, q, q, storage=np.float16, return_report=True)
    assert rep.storage == "float16"
    with pytest.raises(ValueError, match="poly kernels read float32"):
        approx_attn.attention(q, q, q, method="poly", storage="float16")
    with pytest.raises(ValueError, match="method='exact' only"):
        approx_attn.io_cost(8, 8, 8, method="poly", degree=2, storage="float16")


def test_without_f16_storage_float16_inputs_are_converted_on_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What adapters without unpack2x16float (device_info()["f16_storage"] False) do, forced.
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    q, k, v = f16_inputs(8, (2,), (2,), 70, 90, 24, 24)
    want, r32 = attention(q, k, v, storage="float32", return_report=True)
    monkeypatch.setenv("APPROX_ATTN_NO_F16_STORAGE", "1")
    out, rep = attention(q, k, v, return_report=True)
    assert rep.storage == "float32" and rep.input_rounding is None
    assert "converted to float32 on the host" in rep.reason, rep.reason
    assert rep.io_words == rep.io_words_counted == r32.io_words
    np.testing.assert_array_equal(out, want)
    ref = exact_attention(q, k, v)
    assert_close(out, ref, f16_output_tolerance(ref, tolerance32(q, k, v, None)), "host path")


def test_bfloat16_arrays_are_refused_clearly() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes (bfloat16 for NumPy) is absent")
    q = np.ones((1, 4, 8), dtype=ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        approx_attn.attention(q, q, q)


def test_poly_converts_float16_inputs_on_the_host() -> None:
    rng = np.random.default_rng(3)
    L, S, E = 80, 96, 16
    # Small scores (beta < 1): degree 2 certifies eps.
    q = (0.2 * rng.standard_normal((2, L, E))).astype(np.float16)
    k = (0.2 * rng.standard_normal((2, S, E))).astype(np.float16)
    v = rng.standard_normal((2, S, E)).astype(np.float16)
    out, rep = approx_attn.attention(q, k, v, method="poly", eps=1e-3, return_report=True)
    assert out.dtype == np.float16
    assert rep.method == "poly" and rep.storage == "float32" and rep.input_rounding is None
    assert rep.error_bound_per_column is not None
    ref = exact_attention(q, k, v)
    bound = np.asarray(rep.error_bound_per_column)
    # Certified bound, the f32 passes' rounding (well below 1e-5 here) and the float16 output.
    tol = bound + 1e-5 + U16 * (np.abs(ref) + bound) + F16_SUBNORMAL_HALF_SPACING
    assert_close(out, ref, tol, "poly on float16 inputs")


def test_rescaled_operands_fall_back_to_float32_storage() -> None:
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 20, 16)).astype(np.float16)
    k = rng.standard_normal((1, 30, 16)).astype(np.float16)
    v = rng.standard_normal((1, 30, 16)).astype(np.float16)
    # A scale below float32's normal range is folded into q and k on the host (powers of two
    # that float16 need not hold): float32 storage. Scores ~1e-39: every weight 1/S.
    out, rep = attention(q, k, v, scale=1e-40, return_report=True)
    ref = exact_attention(q, k, v, scale=1e-40)
    assert rep.storage == "float32", rep.reason
    assert_close(out, ref, f16_output_tolerance(ref, tolerance32(q, k, v, 1e-40)), "tiny scale")
    # A huge scale makes the kernel rebalance the score operands (q * scale beyond 2^90): also
    # float32 storage, said in the reason. Scores ~1e30 apart: each row is the value row of its
    # largest score (no ties here), so only the float16 output rounding remains.
    out, rep = attention(q, k, v, scale=1e30, return_report=True)
    ref = exact_attention(q, k, v, scale=1e30)
    assert rep.storage == "float32" and "not float16" in rep.reason, rep.reason
    assert_close(out, ref, f16_output_tolerance(ref, 0.0), "huge scale")


def test_host_conversions_match_numpy_bit_for_bit() -> None:
    from approx_attn import _core

    # float16 -> float32: every bit pattern (exact values, NaN payloads as NumPy moves them).
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = np.empty(h.size, dtype=np.float32)
    bad = _core._f16_to_f32(h, f)
    np.testing.assert_array_equal(
        f.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32)
    )
    assert bad == _core._f16_nonfinite(h) == 2 * 1024  # exponent 31, both signs
    # float32 -> float16: a stride through all bit patterns (NaN payloads, both signs), and for
    # every pair of neighbouring float16 values their float32 midpoint (a tie) and the float32
    # values next to it, which only correct ties-to-even rounding gets right.
    sample = np.arange(0, 1 << 32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    lo = np.arange(0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    hi = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)  # 12 significant bits: exact in float32
    top = np.array([65520.0], dtype=np.float32)  # the tie above 65504: Inf
    ties = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf), top])
    x = np.concatenate([sample, ties, -ties])
    out = np.empty(x.size, dtype=np.uint16)
    _core._f32_to_f16(x, out)
    with np.errstate(over="ignore", under="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))


def old_route(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, check: bool) -> np.ndarray:
    """`attention` on float16 inputs as it ran before the binding converted them: NumPy's
    float32 copies, float16 bits packed by a copy (bits at an odd address cannot be read in
    place), NumPy's cast of the output."""
    from approx_attn import _core

    def odd_address(x: np.ndarray) -> np.ndarray:
        buf = np.empty(x.size + 1, dtype=np.uint16)[1:]
        buf[...] = x.reshape(-1).view(np.uint16)
        return buf

    units, L, E = q.shape
    S, Ev = v.shape[-2:]
    flat = [np.ascontiguousarray(x, dtype=np.float32).reshape(-1) for x in (q, k, v)]
    out = np.empty((units, L, Ev), dtype=np.float32)
    bits = [odd_address(x) for x in (q, k, v)]
    assert all(b.ctypes.data % 4 == 2 for b in bits)
    _core.attention(
        *flat,
        out.reshape(-1),
        units,
        1,
        L,
        S,
        E,
        Ev,
        causal,
        1 / math.sqrt(E),
        "exact",
        1e-3,
        None,
        check,
        False,
        False,
        False,
        True,
        bits,
        False,
    )
    return out.astype(np.float16)


@pytest.mark.needs_feature("f16_storage")
@pytest.mark.parametrize(("E", "Ev", "causal"), [(64, 64, False), (24, 80, True), (3, 5, False)])
def test_float16_inputs_give_the_old_routes_bits(E: int, Ev: int, causal: bool) -> None:
    q, k, v = f16_inputs(E + Ev, (2,), (2,), 70, 90, E, Ev)
    v[1, 3, 0] = np.nan  # runs as it is with check_finite=False: the NaN goes through too
    new = attention(q, k, v, is_causal=causal, check_finite=False)
    np.testing.assert_array_equal(
        new.view(np.uint16), old_route(q, k, v, causal, False).view(np.uint16)
    )
    # Contiguous (read in place where E is even) and strided float16 inputs alike.
    qt = np.ascontiguousarray(np.swapaxes(q, 0, 1)).swapaxes(0, 1)
    new = attention(qt, k[:, :, :], np.asfortranarray(v), is_causal=causal, check_finite=False)
    np.testing.assert_array_equal(
        new.view(np.uint16), old_route(q, k, v, causal, False).view(np.uint16)
    )


def test_float16_nonfinite_values_are_counted_with_the_usual_message() -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 8, 16)).astype(np.float16)
    k = q.copy()
    k[0, 1, 2], k[1, 0, 0], k[1, 7, 15] = np.nan, np.inf, -np.inf
    with pytest.raises(
        ValueError, match=r"^key contains 3 NaN or Inf value\(s\) \(after conversion"
    ):
        attention(q, k, q)
    # A broadcast view counts each repeat, as for other dtypes.
    row = np.array([1.0, np.inf] * 8, dtype=np.float16)  # 8 of 16, repeated 16 times
    with pytest.raises(ValueError, match=r"^value contains 128 NaN or Inf value\(s\)"):
        attention(q, q, np.broadcast_to(row, q.shape))


def test_poly_float16_outputs_are_numpys_cast_of_the_float32_ones() -> None:
    """poly_attention and PolyState.step cast their float32 results to float16 through the
    binding's conversion: the bits of NumPy's astype, bit for bit."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, 2, 64, 16)).astype(np.float16) for _ in range(3))
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    kw = {"coeffs": [1.0, 1.0, 0.5], "is_causal": True}
    out16, state16 = approx_attn.poly_attention(q, k, v, return_state=True, **kw)
    out32, state32 = approx_attn.poly_attention(*f32, return_state=True, **kw)
    assert out16.dtype == np.float16
    np.testing.assert_array_equal(out16.view(np.uint16), out32.astype(np.float16).view(np.uint16))
    tok16 = state16.step(q[..., :1, :], k[..., :1, :], v[..., :1, :])
    tok32 = state32.step(*(x[..., :1, :] for x in f32))
    assert tok16.dtype == np.float16
    np.testing.assert_array_equal(tok16.view(np.uint16), tok32.astype(np.float16).view(np.uint16))


def test_conversion_bindings_refuse_mismatched_or_strided_arrays() -> None:
    from approx_attn import _core

    h = np.zeros(4, dtype=np.uint16)
    with pytest.raises(ValueError, match="float16 source has 4 elements, float32 destination 3"):
        _core._f16_to_f32(h, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="float32 source has 3 elements, float16 destination 4"):
        _core._f32_to_f16(np.zeros(3, dtype=np.float32), h)
    with pytest.raises(ValueError, match="dst must be C-contiguous"):
        _core._f16_to_f32(h[:2], np.zeros(4, dtype=np.float32)[::2])
