"""Helpers shared by the pytest files."""

from __future__ import annotations

import numpy as np
import pytest


def assert_close(out: np.ndarray, ref: np.ndarray, tol: np.ndarray | float, what: str = "") -> None:
    """Elementwise |out - ref| <= tol, reporting the worst entry when it is not."""
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    err = np.abs(out.astype(np.float64) - ref)
    tol_arr = np.broadcast_to(np.asarray(tol, dtype=np.float64), err.shape)
    excess = err - tol_arr
    if not (excess <= 0).all():  # also catches NaN
        i = np.unravel_index(int(np.nanargmax(np.where(np.isnan(err), np.inf, excess))), err.shape)
        raise AssertionError(
            f"{what}: {int(np.count_nonzero(~(excess <= 0)))} of {err.size} entries off; worst at "
            f"{tuple(int(x) for x in i)}: got {out[i]!r}, want {ref[i]!r}, |err| {err[i]:.3e} > "
            f"tol {tol_arr[i]:.3e} (max err {np.nanmax(err):.3e})"
        )


def count_io_with_fast_memory(
    monkeypatch: pytest.MonkeyPatch, fast_memory_bytes: str | None
) -> None:
    """Shader I/O counting on, with this fast-memory cap (None: the adapter's own)."""
    monkeypatch.setenv("APPROX_ATTN_COUNT_IO", "1")
    if fast_memory_bytes is None:
        monkeypatch.delenv("APPROX_ATTN_FAST_MEMORY_BYTES", raising=False)
    else:
        monkeypatch.setenv("APPROX_ATTN_FAST_MEMORY_BYTES", fast_memory_bytes)
