"""Bad inputs and bad environments raise clear exceptions that name the array, shape or variable.

Also: empty query sequences, a missing adapter or backend, problems too large for the budget, and
recovery after the GPU device is destroyed.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import approx_attn
import numpy as np
import pytest
from approx_attn.reference import exact_attention

# The exact method explicitly: "auto" may pick the approximate polynomial method.
attention = functools.partial(approx_attn.attention, method="exact")

SUBPROCESS_TIMEOUT_S = 120


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def qkv(
    q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return randn(rng, q_shape), randn(rng, k_shape), randn(rng, v_shape)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (a fresh device) with extra environment variables."""
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


# (query shape, key shape, value shape, enable_gqa, message fragments)
SHAPE_ERRORS = [
    pytest.param(
        (2, 4, 8), (4, 8), (4, 8), False, ["same number of dimensions", "(2, 4, 8)"], id="rank"
    ),
    pytest.param(
        (2, 4, 8), (3, 5, 8), (3, 5, 8), False, ["leading dimensions", "(3, 5, 8)"], id="lead-dims"
    ),
    pytest.param(
        (2, 3, 4, 8), (2, 2, 5, 8), (2, 2, 5, 8), False, ["enable_gqa"], id="heads-without-gqa"
    ),
    pytest.param((4, 8), (5, 7), (5, 8), False, ["head dimension E", "(4, 8)", "(5, 7)"], id="E"),
    pytest.param((4, 8), (5, 8), (6, 8), False, ["sequence length S", "(5, 8)", "(6, 8)"], id="S"),
    pytest.param(
        (2, 4, 8), (2, 5, 8), (3, 5, 8), False, ["key and value", "(3, 5, 8)"], id="kv-lead"
    ),
    pytest.param(
        (1, 6, 4, 8),
        (1, 4, 5, 8),
        (1, 4, 5, 8),
        True,
        ["must divide query heads", "(1, 6, 4, 8)", "(1, 4, 5, 8)"],
        id="gqa-non-dividing",
    ),
    pytest.param(
        (2, 6, 4, 8),
        (3, 2, 5, 8),
        (3, 2, 5, 8),
        True,
        ["except the head dimension", "(3, 2, 5, 8)"],
        id="gqa-batch-mismatch",
    ),
    pytest.param((4, 8), (0, 8), (0, 8), False, ["S must be at least 1", "key", "(0, 8)"], id="S0"),
    pytest.param((4, 0), (5, 0), (5, 8), False, ["at least 1", "(4, 0)"], id="E0"),
    pytest.param((4, 8), (5, 8), (5, 0), False, ["at least 1", "(5, 0)"], id="Ev0"),
]


@pytest.mark.parametrize(("qs", "ks", "vs", "gqa", "fragments"), SHAPE_ERRORS)
def test_shape_errors(
    qs: tuple[int, ...], ks: tuple[int, ...], vs: tuple[int, ...], gqa: bool, fragments: list[str]
) -> None:
    q, k, v = qkv(qs, ks, vs)
    with pytest.raises(ValueError) as info:
        attention(q, k, v, enable_gqa=gqa)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_one_dimensional_input(name: str) -> None:
    arrays = dict(zip(("query", "key", "value"), qkv((4, 8), (5, 8), (5, 8))))
    arrays[name] = arrays[name][0]
    with pytest.raises(ValueError, match=f"{name} must have at least 2 dimensions.*\\(8,\\)"):
        attention(arrays["query"], arrays["key"], arrays["value"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_float_dtypes(name: str, dtype: Any) -> None:
    arrays = dict(zip(("query", "key", "value"), qkv((4, 8), (5, 8), (5, 8))))
    arrays[name] = arrays[name].astype(dtype)
    with pytest.raises(TypeError) as info:
        attention(arrays["query"], arrays["key"], arrays["value"])
    msg = str(info.value)
    assert f"{name} must be a floating-point array" in msg and np.dtype(dtype).name in msg, msg


@pytest.mark.parametrize("method", ["exact", "auto"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_finite_inputs(name: str, bad: float, method: str) -> None:
    arrays = dict(zip(("query", "key", "value"), qkv((2, 4, 8), (2, 5, 8), (2, 5, 8))))
    arrays[name][1, 2, 3] = bad
    args = (arrays["query"], arrays["key"], arrays["value"])
    with pytest.raises(ValueError, match=f"^{name} contains 1 NaN or Inf"):
        attention(*args, method=method)
    # Skipping the check must not raise; the output may then hold NaN.
    out = attention(*args, method=method, check_finite=False)
    assert out.shape == (2, 4, 8) and out.dtype == np.float32


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_non_finite_found_in_every_layout_and_slice(layout: str) -> None:
    # The check scans memory-contiguous inputs in slices of 65,536 elements and strided ones in
    # one go: a NaN in the last slice of a 2 x 300 x 256 key (153,600 elements) must be found.
    q, k, v = qkv((2, 4, 256), (2, 300, 256), (2, 300, 8))
    if layout == "transposed":  # same memory block, permuted axes
        k = np.ascontiguousarray(k.transpose(0, 2, 1)).transpose(0, 2, 1)
    elif layout == "strided":  # every other row of a larger array
        k = np.repeat(k, 2, axis=1)[:, ::2]
    k[1, 299, 255] = np.nan
    with pytest.raises(ValueError, match="^key contains 1 NaN or Inf"):
        attention(q, k, v, method="exact")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(("lead", "ev"), [((), 8), ((2,), 3), ((2, 3), 5)], ids=["2d", "3d", "4d"])
def test_empty_query_sequence(lead: tuple[int, ...], ev: int, dtype: Any) -> None:
    rng = np.random.default_rng(0)
    q = randn(rng, lead + (0, 8), dtype)
    k, v = randn(rng, lead + (5, 8), dtype), randn(rng, lead + (5, ev), dtype)
    out = attention(q, k, v, is_causal=True)
    assert out.shape == lead + (0, ev) and out.dtype == dtype


@pytest.mark.parametrize("method", ["poly-typo", "EXACT", ""])
def test_unknown_method(method: str) -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        attention(*qkv((4, 8), (5, 8), (5, 8)), method=method)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1, 2.0, float("nan")])  # "0.1": test_arguments
def test_eps_out_of_range(eps: Any) -> None:
    with pytest.raises(ValueError, match="eps must be a number in \\(0, 1\\)"):
        attention(*qkv((4, 8), (5, 8), (5, 8)), eps=eps)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_non_finite_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="scale must be finite"):
        attention(*qkv((4, 8), (5, 8), (5, 8)), scale=scale)


def test_missing_adapter_raises_no_device_error() -> None:
    proc = run_python(
        """
        import numpy as np, approx_attn
        x = np.ones((2, 4), np.float32)
        try:
            approx_attn.attention(x, x, x, method="exact")
        except Exception as e:
            print(type(e).__name__, isinstance(e, approx_attn.NoDeviceError), e)
        """,
        APPROX_ATTN_ADAPTER="no-such-adapter-xyz",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("NoDeviceError True"), proc.stdout
    assert "APPROX_ATTN_ADAPTER" in proc.stdout and "no-such-adapter-xyz" in proc.stdout


def test_unknown_backend_raises_value_error() -> None:
    proc = run_python(
        """
        import numpy as np, approx_attn
        x = np.ones((2, 4), np.float32)
        try:
            approx_attn.attention(x, x, x, method="exact")
        except Exception as e:
            print(type(e).__name__, e)
        """,
        APPROX_ATTN_BACKEND="bogus",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ValueError"), proc.stdout
    assert "APPROX_ATTN_BACKEND" in proc.stdout and "bogus" in proc.stdout


def test_unknown_backend_in_list_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    # list_adapters reads the variable at every call, so this works in-process.
    monkeypatch.setenv("APPROX_ATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="APPROX_ATTN_BACKEND"):
        approx_attn.list_adapters()


@pytest.mark.parametrize(("e", "ev"), [(16, 16), (3, 64), (256, 256)])
def test_fast_memory_too_small(e: int, ev: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 bytes = 16 words; the smallest tile (1 query row, 1 key row) needs a Q row and a K/V row
    # (Q and K rows padded by one tile element against bank conflicts) plus one element of K/V
    # tail padding, in elements of `lanes` floats (vec4 where E and Ev are multiples of 4), then
    # 2 words (score row padded) + 1 (the one thread's partial row statistic).
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", "64")
    lanes = 4 if e % 4 == 0 and ev % 4 == 0 else 1
    row = e // lanes + 1
    need = lanes * (row + max(row, ev // lanes) + 1) + 3
    with pytest.raises(ValueError) as info:
        attention(*qkv((4, e), (5, e), (5, ev)))
    msg = str(info.value)
    for fragment in (f"E={e}", f"Ev={ev}", f"needs at least {need} words", "offers 16"):
        assert fragment in msg, (fragment, msg)


def test_binding_too_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPROX_ATTN_MAX_BINDING_BYTES", "16")
    with pytest.raises(ValueError, match="one row of 66 floats does not fit .* 16 bytes"):
        attention(*qkv((4, 64), (5, 64), (5, 64)))


@pytest.mark.parametrize("var", ["APPROX_ATTN_FAST_MEMORY_BYTES", "APPROX_ATTN_MAX_BINDING_BYTES"])
def test_malformed_budget_variable(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, "16k")
    with pytest.raises(ValueError, match=f"{var}=.*16k.* is not a whole number"):
        attention(*qkv((4, 8), (5, 8), (5, 8)))


def test_budget_variables_never_raise_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    words = approx_attn.device_info()["fast_memory_words"]
    monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", str(words * 4 * 16))
    _, rep = attention(*qkv((4, 8), (5, 8), (5, 8)), return_report=True)
    assert rep.fast_memory_words == words


def test_recovers_after_device_loss() -> None:
    # In a subprocess: destroying the device must not leak into the other tests.
    proc = run_python(
        """
        import json
        import numpy as np, approx_attn
        from approx_attn.reference import exact_attention
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((2, 64, 16), dtype=np.float32) for _ in range(3))
        def err():
            out = approx_attn.attention(q, k, v, is_causal=True, method="exact")
            return float(np.abs(out - exact_attention(q, k, v, is_causal=True)).max())
        before = err()
        approx_attn._core._destroy_device()
        try:
            first = ["ok", err()]
        except approx_attn.DeviceError as e:
            first = ["DeviceError", str(e)]
        except Exception as e:
            first = [type(e).__name__, str(e)]
        print(json.dumps({"before": before, "first": first, "second": err()}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # Same tolerance scale as test_exact (E = 16, |s| < 10, range(V) < 10): 1e-5 is generous.
    assert res["before"] < 1e-5
    assert res["first"][0] in ("ok", "DeviceError"), res
    if res["first"][0] == "ok":
        assert res["first"][1] < 1e-5, res
    assert res["second"] < 1e-5, res


def test_valid_inputs_still_work_after_errors() -> None:
    # A failed call (here in the planner) must leave the device usable.
    q, k, v = qkv((4, 8), (5, 8), (5, 8))
    with pytest.raises(ValueError):
        attention(q, k[:, :7], v)
    out = attention(q, k, v)
    np.testing.assert_allclose(out, exact_attention(q, k, v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "auto"])
def test_float64_beyond_float32_range_is_refused(method: str) -> None:
    # 1e300 is finite in float64 but Inf once rounded to float32 for the GPU: it must raise like
    # an Inf (the exact path checks on the host, poly and auto on the GPU after the conversion),
    # not turn into NaN output.
    q, k, v = (x.astype(np.float64) for x in qkv((2, 4, 8), (2, 5, 8), (2, 5, 8)))
    k[0, 1, 2] = 1e300
    with pytest.raises(ValueError, match="^key contains 1 NaN or Inf"):
        attention(q, k, v, method=method)


def test_a_rust_panic_reaches_python_as_a_device_error() -> None:
    # A panic would otherwise arrive as pyo3's PanicException, a BaseException that
    # `except Exception` does not catch; the binding turns it into DeviceError naming it.
    from approx_attn import _core

    with pytest.raises(approx_attn.DeviceError, match="internal error.*on purpose"):
        _core._panic_for_test()
    # The next call works.
    x = np.ones((1, 4, 4), np.float32)
    assert approx_attn.attention(x, x, x, method="exact").shape == (1, 4, 4)


def test_binding_io_cost_refuses_empty_keys() -> None:
    # The binding itself (below the Python checks) refused S = 0 with a panic before.
    from approx_attn import _core

    with pytest.raises(ValueError, match="S must be at least 1"):
        _core.io_cost(1, 1, 10, 0, 16, 16, False, "exact", None, None, None, 8192)
