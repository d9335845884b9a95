"""Bounded resources: the process's resident memory stays flat (within MARGIN_MIB) over
SOAK_CALLS calls of each method, after warm-up calls that compile the kernels and fill the pooled
staging buffers. Known defect, pinned by a strict xfail: on lavapipe through Vulkan the poly
paths grow per call (8 heads, L = 512, E = 16, 150 calls: poly 326 MiB, the polynomial primitive
69 MiB, causal 66 MiB), while exact stays flat there (0.0 MiB) and the primitive and poly stay
flat through the GL backend on the same llvmpipe (0.5 and 0.0 MiB over 60 calls; measured
2026-12-06; no pipeline is compiled per call). The GL run of CI skips this module (too slow
there)."""

from __future__ import annotations

import approx_attn
import numpy as np
import pytest

SOAK_CALLS = 60
WARMUP_CALLS = 5
MARGIN_MIB = 8.0  # allocator noise; the defect grows 26-130 MiB over SOAK_CALLS


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def call(method: str, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    if method == "primitive":
        return approx_attn.poly_attention(q, k, v, coeffs="based")
    if method == "primitive_causal":
        return approx_attn.poly_attention(q, k, v, coeffs="based", is_causal=True)
    return approx_attn.attention(q, k, v, method=method)


@pytest.mark.parametrize("method", ["exact", "poly", "primitive", "primitive_causal"])
def test_resident_memory_stays_flat(method, request):
    info = approx_attn.device_info()
    if info["backend"] == "vulkan" and "llvmpipe" in info["adapter"] and method != "exact":
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="lavapipe Vulkan: the poly paths grow per call")
        )
    rng = np.random.default_rng(0)
    q, k, v = (0.3 * rng.standard_normal((1, 8, 512, 16), dtype=np.float32) for _ in range(3))
    for _ in range(WARMUP_CALLS):
        call(method, q, k, v)
    before = rss_mib()
    for _ in range(SOAK_CALLS):
        call(method, q, k, v)
    grown = rss_mib() - before
    print(f"{method}: {grown:.1f} MiB over {SOAK_CALLS} calls")
    assert grown <= MARGIN_MIB
