"""Argument types are checked as in PyTorch: booleans must be bools (numpy.bool_ too), numbers may
be NumPy scalars, any float byte order is accepted; io_cost and io_lower_bound check every argument.

Wrong types raise TypeError (also a ValueError, as some of them did before); bad values ValueError.
Inputs whose host copies would not fit in the available memory raise MemoryError (also a
ValueError) before any copy starts; the finiteness check never copies more than a slice.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import approx_attn
import numpy as np
import pytest
from approx_attn import _core
from approx_attn.reference import exact_attention


def small_qkv(dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((2, 5, 8), (2, 6, 8), (2, 6, 4)))


BOOL_ARGS = ["is_causal", "enable_gqa", "check_finite", "return_report"]


@pytest.mark.parametrize("bad", ["no", "", 1, 0, 1.0, None, [True]], ids=repr)
@pytest.mark.parametrize("name", BOOL_ARGS)
def test_booleans_must_be_bools(name: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=f"^{name} must be a bool, not {type(bad).__name__}"):
        approx_attn.attention(*small_qkv(), method="exact", **{name: bad})


@pytest.mark.parametrize("name", BOOL_ARGS)
def test_numpy_bools_are_bools(name: str) -> None:
    q, k, v = small_qkv()
    res = approx_attn.attention(q, k, v, method="exact", **{name: np.bool_(False)})
    assert isinstance(res, np.ndarray) and res.shape == (2, 5, 4)


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0], ids=repr)
def test_tensor_cores_must_be_none_or_a_bool(bad: Any) -> None:
    # 1 == True in Python: it used to pass this check and fail in the binding.
    with pytest.raises(TypeError, match="^tensor_cores must be None or a bool, not"):
        approx_attn.attention(*small_qkv(), method="poly", degree=2, tensor_cores=bad)


def test_type_errors_are_also_value_errors() -> None:
    # degree=2.0 and tensor_cores="yes" raised ValueError before; code catching it keeps working.
    with pytest.raises(ValueError, match="degree must be an integer, not float"):
        approx_attn.attention(*small_qkv(), method="poly", degree=2.0)


@pytest.mark.parametrize(
    "eps", [np.float32(0.01), np.float64(0.01), np.float16(0.01), 0.01], ids=repr
)
def test_eps_may_be_a_numpy_scalar(eps: Any) -> None:
    q, k, v = small_qkv()
    _, rep = approx_attn.attention(q * 0.1, k * 0.1, v, method="poly", eps=eps, return_report=True)
    assert rep.method == "poly" and rep.error_bound is not None


@pytest.mark.parametrize("scale", [np.float32(0.25), np.float64(0.25), np.int64(1), 1, 0.25])
def test_scale_may_be_a_numpy_scalar(scale: Any) -> None:
    q, k, v = small_qkv()
    out = approx_attn.attention(q, k, v, method="exact", scale=scale)
    ref = exact_attention(q, k, v, scale=float(scale))
    # float32 scores of 8 terms and 6 keys with |V| < 4: a few float32 ulps.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "bad", "what"),
    [
        ("scale", "1", "a number"),
        ("scale", True, "a number"),
        ("scale", np.ones(1), "a number"),
        ("eps", "0.1", "a number"),
        ("eps", True, "a number"),
        ("eps", None, "a number"),
        ("method", None, "a str"),
        ("method", 1, "a str"),
    ],
    ids=repr,
)
def test_numbers_and_strings_must_have_their_type(name: str, bad: Any, what: str) -> None:
    kwargs = {"method": "poly"} if name == "eps" else {}
    kwargs[name] = bad
    with pytest.raises(TypeError, match=f"^{name} must be {what}, not {type(bad).__name__}"):
        approx_attn.attention(*small_qkv(), **kwargs)


@pytest.mark.parametrize("degree", [np.int64(2), np.int8(2), 2])
def test_degree_may_be_a_numpy_integer(degree: Any) -> None:
    q, k, v = small_qkv()
    _, rep = approx_attn.attention(
        q * 0.1, k * 0.1, v, method="poly", degree=degree, return_report=True
    )
    assert rep.degree == 2


@pytest.mark.parametrize("bad", [True, 2.0, "2", np.float32(2)], ids=repr)
def test_degree_must_be_an_integer(bad: Any) -> None:
    with pytest.raises(TypeError, match=f"^degree must be an integer, not {type(bad).__name__}"):
        approx_attn.attention(*small_qkv(), method="poly", degree=bad)


@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_scale_beyond_float32_with_scores_beyond_it_is_refused(scale: float) -> None:
    # Finite in Python, Inf as a float32: folded into the inputs, where the scores fit float32
    # (tests/test_numerics.py); here they do not (|scale| max|q| max|k| > 1e38), so the call
    # says so instead of returning the zeros it once did.
    with pytest.raises(ValueError, match=r"can overflow float32"):
        approx_attn.attention(*small_qkv(), method="exact", scale=scale)


@pytest.mark.parametrize("method", ["exact", "auto"])
@pytest.mark.parametrize("order", [">", "<", "="])
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
def test_any_byte_order(dtype: str, order: str, method: str) -> None:
    q, k, v = (x.astype(order + dtype) for x in small_qkv(np.float64))
    out = approx_attn.attention(q, k, v, method=method)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    native = approx_attn.attention(*(x.astype(dtype) for x in (q, k, v)), method=method)
    np.testing.assert_array_equal(out, native)


def test_big_endian_non_finite_is_found() -> None:
    q, k, v = (x.astype(">f8") for x in small_qkv(np.float64))
    k[1, 2, 3] = 1e300  # beyond float32's range: an Inf on the GPU
    with pytest.raises(ValueError, match="^key contains 1 NaN or Inf value"):
        approx_attn.attention(q, k, v, method="exact")


@pytest.mark.parametrize("dtype", [np.longdouble, np.complex128, np.int16, object])
def test_other_dtypes_are_type_errors(dtype: Any) -> None:
    if np.dtype(dtype).itemsize == 8 and np.dtype(dtype).kind == "f":
        pytest.skip("longdouble is float64 on this platform")
    q, k, v = small_qkv()
    with pytest.raises(TypeError, match="^query must be a floating-point array"):
        approx_attn.attention(q.astype(dtype), k, v, method="exact")


# io_cost and io_lower_bound


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((-1, 10, 16), {}, ValueError, "^L must be a non-negative integer, got -1"),
        ((10, 0, 16), {}, ValueError, "^S must be a positive integer, got 0"),
        ((10, -3, 16), {}, ValueError, "^S must be a positive integer, got -3"),
        ((10, 10, 0), {}, ValueError, "^E must be a positive integer, got 0"),
        ((10, 10, 16, 0), {}, ValueError, "^Ev must be a positive integer, got 0"),
        ((10.0, 10, 16), {}, TypeError, "^L must be an integer, not float"),
        ((10, "10", 16), {}, TypeError, "^S must be an integer, not str"),
        ((10, 10, True), {}, TypeError, "^E must be an integer, not bool"),
        ((10, 10, 16), {"heads": 0}, ValueError, "^heads must be a positive integer"),
        ((10, 10, 16), {"kv_heads": 0}, ValueError, "^kv_heads must be a positive integer"),
        ((10, 10, 16), {"heads": 4, "kv_heads": 3}, ValueError, "must divide heads=4"),
        ((10, 10, 16), {"is_causal": "yes"}, TypeError, "^is_causal must be a bool, not str"),
        ((10, 10, 16), {"method": "auto"}, ValueError, "^method must be one of"),
        ((10, 10, 16), {"method": None}, TypeError, "^method must be a str, not NoneType"),
        ((10, 10, 16), {"degree": 2}, ValueError, "apply to method='poly' only"),
        ((10, 10, 16), {"fast_memory_words": 0}, ValueError, "^fast_memory_words must be a pos"),
        ((10, 10, 16), {"fast_memory_words": 1.5}, TypeError, "^fast_memory_words must be an int"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_io_cost_checks_every_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    kwargs = {"method": "exact", "fast_memory_words": 8192, **kwargs}
    with pytest.raises(error, match=match):
        approx_attn.io_cost(*args, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs degree=, or eps= and beta="),
        ({"eps": 0.1}, ValueError, "needs degree=, or eps= and beta="),
        ({"degree": 2, "eps": 0.1, "beta": 1.0}, ValueError, r"not both"),
        ({"degree": -1}, ValueError, "^degree must be a non-negative integer"),
        ({"degree": 2.0}, TypeError, "^degree must be an integer, not float"),
        ({"eps": 1.5, "beta": 1.0}, ValueError, r"^eps must be a number in \(0, 1\)"),
        ({"eps": "0.1", "beta": 1.0}, TypeError, "^eps must be a number, not str"),
        ({"eps": 0.1, "beta": -1.0}, ValueError, "^beta must be a finite number >= 0"),
        ({"eps": 0.1, "beta": float("inf")}, ValueError, "^beta must be a finite number >= 0"),
        ({"eps": 0.1, "beta": float("nan")}, ValueError, "^beta must be a finite number >= 0"),
    ],
    ids=repr,
)
def test_io_cost_poly_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        approx_attn.io_cost(10, 10, 16, method="poly", fast_memory_words=8192, **kwargs)


@pytest.mark.parametrize("name", ["L", "S", "E", "Ev", "heads", "degree", "fast_memory_words"])
def test_sizes_beyond_usize_are_overflow_errors(name: str) -> None:
    kwargs: dict[str, Any] = {"L": 10, "S": 10, "E": 16, "Ev": 16, "method": "poly", "degree": 2}
    kwargs["fast_memory_words"] = 8192
    kwargs[name] = 2**70
    with pytest.raises(OverflowError, match=f"^{name}={2**70} is too large"):
        approx_attn.io_cost(**kwargs)


def test_io_cost_accepts_numpy_scalars() -> None:
    n, e = np.int64(300), np.int32(16)
    cost = approx_attn.io_cost(
        n, n, e, method="poly", eps=np.float32(0.01), beta=np.float64(1.0), fast_memory_words=8192
    )
    assert cost == approx_attn.io_cost(
        300, 300, 16, method="poly", eps=float(np.float32(0.01)), beta=1.0, fast_memory_words=8192
    )
    assert approx_attn.io_cost(0, 5, 16, method="exact", fast_memory_words=8192)["total"] == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((-1, 10, 16), {}, ValueError, "^L must be a non-negative integer, got -1"),
        ((10, 0, 16), {}, ValueError, "^S must be a positive integer, got 0"),
        ((10, 10, 0), {}, ValueError, "^E must be a positive integer, got 0"),
        ((10, 10, 1.5), {}, TypeError, "^E must be an integer, not float"),
        ((10, 10, 16), {"method": "bogus"}, ValueError, "^method must be one of"),
        ((10, 10, 16), {"method": "exact", "degree": 2}, ValueError, "applies to method='poly'"),
        ((10, 10, 16), {"degree": None}, ValueError, "needs degree="),
        ((10, 10, 16), {"degree": -2}, ValueError, "^degree must be a non-negative integer"),
        ((10, 10, 16), {"fast_memory_words": 0}, ValueError, "^fast_memory_words must be a pos"),
        ((10, -1, 16), {}, ValueError, "^S must be a positive integer, got -1"),
        ((10, 10, -3), {}, ValueError, "^E must be a positive integer, got -3"),
        ((True, 10, 16), {}, TypeError, "^L must be an integer, not bool"),
        ((10, np.bool_(True), 16), {}, TypeError, "^S must be an integer, not bool"),
        ((10, 10, False), {}, TypeError, "^E must be an integer, not bool"),
        ((10.0, 10, 16), {}, TypeError, "^L must be an integer, not float"),
        ((10, "10", 16), {}, TypeError, "^S must be an integer, not str"),
        ((10, 10, np.float64(16)), {}, TypeError, "^E must be an integer, not float64"),
        ((10, 10, 16), {"degree": True}, TypeError, "^degree must be an integer, not bool"),
        ((10, 10, 16), {"degree": 2.0}, TypeError, "^degree must be an integer, not float"),
        ((10, 10, 16), {"method": "exact", "degree": True}, TypeError, "^degree must be an int"),
        ((10, 10, 16), {"method": None}, TypeError, "^method must be a str, not NoneType"),
        ((10, 10, 16), {"method": "auto"}, ValueError, "^method must be one of"),
        ((10, 10, 16), {"fast_memory_words": True}, TypeError, "^fast_memory_words must be an int"),
        ((10, 10, 16), {"fast_memory_words": 1.5}, TypeError, "^fast_memory_words must be an int"),
        ((10, 10, 16), {"fast_memory_words": -8}, ValueError, "^fast_memory_words must be a pos"),
        ((2**70, 10, 16), {}, OverflowError, f"^L={2**70} is too large"),
        ((10, 10, 16), {"degree": 2**70}, OverflowError, f"^degree={2**70} is too large"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_io_lower_bound_checks_every_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    kwargs = {"degree": 2, "fast_memory_words": 8192, **kwargs}
    with pytest.raises(error, match=match):
        approx_attn.io_lower_bound(*args, **kwargs)


def test_io_lower_bound_accepts_numpy_scalars() -> None:
    a = approx_attn.io_lower_bound(
        np.int64(1024), 1024, np.int16(16), degree=np.int8(2), fast_memory_words=np.int64(8192)
    )
    assert a == approx_attn.io_lower_bound(1024, 1024, 16, degree=2, fast_memory_words=8192) > 0
    b = approx_attn.io_lower_bound(
        np.uint32(0), np.uint64(7), np.int32(4), method="exact", fast_memory_words=np.uint16(512)
    )
    assert b == approx_attn.io_lower_bound(0, 7, 4, method="exact", fast_memory_words=512) > 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 0, 16, "exact", None, 8192), "^key/value sequence length S must be at least 1"),
        ((10, 10, 0, "exact", None, 8192), "^head dimension E must be at least 1"),
        ((10, 10, 16, "exact", None, 0), "^fast_memory_words must be at least 1"),
        ((10, 10, 16, "auto", None, 8192), "^method must be one of"),
        ((10, 10, 16, "bogus", 2, 8192), "^method must be one of"),
        ((10, 10, 16, "exact", 2, 8192), "applies to method='poly' only"),
        ((10, 10, 16, "poly", None, 8192), "needs a degree"),
    ],
    ids=repr,
)
def test_io_lower_bound_checks_its_arguments_in_rust_too(args: tuple[Any, ...], match: str) -> None:
    # The binding behind io_lower_bound checks what the Python layer checks (io_cost's rules).
    with pytest.raises(ValueError, match=match):
        approx_attn._core.io_lower_bound(*args)
    with pytest.raises(OverflowError):  # PyO3: a negative int is no usize
        approx_attn._core.io_lower_bound(-1, 10, 16, "exact", None, 8192)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_io_closed_form_refuses_non_finite_or_negative_sizes(bad: float) -> None:
    for i in range(5):
        args = [100.0, 100.0, 16.0, 153.0, 8192.0]
        args[i] = bad
        with pytest.raises(ValueError, match="must be a finite number >="):
            approx_attn._core.io_closed_form(*args)


# Host memory


def test_broadcast_view_too_large_for_host_memory_raises_at_once() -> None:
    # (1, 1, 2**31, 1) float32 views of 4 bytes: three 8 GiB float32 copies (the binding reads
    # them in place), plus the output, 32 GiB; it used to start copying (in the finiteness check
    # or the float32 conversion) instead of raising.
    avail = approx_attn._available_memory()
    if avail is None or avail >= 32 << 30:
        pytest.skip(f"available memory unknown or at least 32 GiB ({avail})")
    x = np.broadcast_to(np.float32(1.0), (1, 1, 2**31, 1))
    for method in ("exact", "auto"):
        t0 = time.perf_counter()
        with pytest.raises(MemoryError, match=r"needs 32\.00 GiB .* of host memory, but") as info:
            approx_attn.attention(x, x, x, method=method)
        assert isinstance(info.value, ValueError)
        assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_memory_check_counts_every_copy(dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # q, k, v of 2**22 elements as float16/float64: 3 float32 copies here (the binding reads
    # them in place), the float32 output and its cast to the query's dtype; float16 also its
    # storage: the bits of each input (copied from the broadcast view) and their rows packed to
    # words (E = 1: 4 bytes).
    n = 2**22
    need = 3 * n * 4 + n * 4 + n * np.dtype(dtype).itemsize
    if dtype == np.float16:
        need += 3 * (n * 2 + n * 4)
    x = np.broadcast_to(dtype(1.0), (1, n, 1))
    monkeypatch.setattr(approx_attn, "_available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=f"needs [0-9.]+ GiB \\({need:,} bytes\\)"):
        approx_attn.attention(x, x, x, method="exact", check_finite=False)


def test_contiguous_float32_inputs_are_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # No copy of the inputs anywhere: only the output counts (64 MiB, at the check's threshold).
    n = 2**24
    x = np.ones((1, n, 1), np.float32)
    need = n * 4
    monkeypatch.setattr(approx_attn, "_available_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=f"\\({need:,} bytes\\)"):
        approx_attn.attention(x, x, x, method="exact")


def test_small_calls_skip_the_memory_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approx_attn, "_available_memory", lambda: 0)
    out = approx_attn.attention(*small_qkv(), method="exact")
    assert out.shape == (2, 5, 4)


def test_available_memory_is_known_here() -> None:
    avail = approx_attn._available_memory()
    assert avail is not None and avail > 0


def test_non_finite_in_a_huge_broadcast_view_is_counted_without_a_copy() -> None:
    row = np.ones(8, np.float32)
    row[3] = np.nan
    k = np.broadcast_to(row, (1, 1, 2**31, 8))  # 64 GiB if expanded
    q = np.ones((1, 1, 4, 8), np.float32)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"^key contains {2**31} NaN or Inf value"):
        approx_attn.attention(q, k, k, method="exact")
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    ("layout", "bad"),
    [("transposed", 1), ("strided", 1), ("broadcast-rows", 1 << 16), ("float64-strided", 1)],
)
def test_finiteness_check_allocates_at_most_a_slice(layout: str, bad: int) -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 1024, 4096), dtype=np.float32)  # 32 MiB

    def view() -> np.ndarray:
        return {
            "transposed": lambda: base.transpose(0, 2, 1),
            "strided": lambda: base[:, ::2, 1:],
            "broadcast-rows": lambda: np.broadcast_to(base[:, :1], (2, 1 << 16, 4096)),
            "float64-strided": lambda: base[:, ::4].astype(np.float64)[:, :, ::2],
        }[layout]()

    x = view()
    tracemalloc.start()
    try:
        approx_attn._check_finite(x, "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One slice of 65,536 elements: a float64 buffer, its |x| and the boolean result, 1.1 MiB.
    assert peak < 2 << 20, f"{peak:,} bytes"
    base[1, 0, -2] = np.inf  # in every view; repeated 2**16 times in the broadcast one
    with pytest.raises(ValueError, match=f"^x contains {bad} NaN or Inf"):
        approx_attn._check_finite(view(), "x")


# ---------------------------------------------------------------------------------------------
# Sizes near 2^64: every call raises OverflowError or ValueError, never panics or wraps.

HUGE = [2**62, 2**63 + 1, 2**64 - 1]


@pytest.mark.parametrize("n", HUGE)
def test_huge_row_counts_overflow_cleanly(n: int) -> None:
    empty = np.zeros(0, np.float32)
    # A wrapped element count (2^62 rows x E = 4 is 0 mod 2^64) once let this through to a
    # panic in the pre-pass.
    with pytest.raises(OverflowError, match="than a usize counts"):
        _core.attention(
            empty,
            np.zeros(32, np.float32),
            np.zeros(32, np.float32),
            np.zeros(0, np.float32),
            1,
            1,
            n,
            8,
            4,
            4,
            False,
            0.5,
            "poly",
            1e-3,
            None,
            True,
        )
    with pytest.raises((OverflowError, ValueError)):
        _core.attention(
            empty,
            empty,
            empty,
            empty.copy(),
            n,
            4,
            8,
            8,
            4,
            4,
            False,
            0.5,
            "exact",
            1e-3,
            None,
            True,
        )
    for kw in ({"method": "exact"}, {"method": "poly", "degree": 2}):
        with pytest.raises(OverflowError):
            approx_attn.io_cost(2**62, 16, 64, heads=n, fast_memory_words=8192, **kw)
        with pytest.raises(OverflowError):
            approx_attn.io_cost(n, n, 64, heads=4, kv_heads=4, fast_memory_words=8192, **kw)


@pytest.mark.parametrize("degree", [65, 2**62, 2**64 - 1])
def test_huge_forced_degree_is_refused_at_once(degree: int) -> None:
    # Fitting degree g fits every degree below it first: 2^62 never ended.
    q = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="largest degree that can be forced"):
        approx_attn.attention(q, q, q, method="poly", degree=degree)
    with pytest.raises(ValueError, match="largest degree that can be forced"):
        _core.fit_polynomial(1.0, degree=degree)
    with pytest.raises((OverflowError, ValueError)):
        approx_attn.io_cost(64, 64, 64, method="poly", degree=degree, fast_memory_words=8192)


def test_saturated_ranks_raise_instead_of_returning_2_64() -> None:
    with pytest.raises(OverflowError, match="beyond 2\\^64 - 1"):
        _core.num_features(2**20, 10)
    with pytest.raises(OverflowError, match="beyond 2\\^64 - 1"):
        approx_attn.io_lower_bound(
            2**62, 2**62, 2**20, method="poly", degree=10, fast_memory_words=8192
        )
    assert _core.num_features(64, 2) == 2145
