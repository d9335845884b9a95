"""`device_info()` and `list_adapters()`: keys, types and consistency with the driver's limits."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import approx_attn
import numpy as np
import pytest

# The exact method explicitly: "auto" may pick the approximate polynomial method.
attention = functools.partial(approx_attn.attention, method="exact")

BOOL_KEYS = ("shader_f16", "subgroups", "timestamp_queries", "cooperative_matrix")
STR_KEYS = ("adapter", "backend", "device_type")


def test_device_info_keys_and_types() -> None:
    info = approx_attn.device_info()
    for key in STR_KEYS:
        assert isinstance(info[key], str) and info[key], (key, info)
    for key in BOOL_KEYS:
        assert isinstance(info[key], bool), (key, info[key])
    words = info["fast_memory_words"]
    assert isinstance(words, int) and not isinstance(words, bool) and words > 0
    # WebGPU guarantees at least 16 KiB of workgroup storage.
    assert words >= 4096
    binding = info["max_storage_buffer_binding_size"]
    assert isinstance(binding, int) and binding > 0
    assert info["backend"] in ("vulkan", "metal", "dx12", "gl"), info["backend"]


def test_device_info_is_stable() -> None:
    assert approx_attn.device_info() == approx_attn.device_info()


def vulkan_limits() -> dict[str, dict[str, int]]:
    """deviceName -> {limit: value} from `vulkaninfo` (each limit follows its device's name)."""
    out = subprocess.run(
        ["vulkaninfo"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    limits: dict[str, dict[str, int]] = {}
    name = None
    for line in out.splitlines():
        m = re.match(r"\s*deviceName\s*=\s*(.+?)\s*$", line)
        if m:
            name = m.group(1)
            limits.setdefault(name, {})
            continue
        m = re.match(r"\s*(maxComputeSharedMemorySize|maxStorageBufferRange)\s*=\s*(\d+)", line)
        if m and name is not None:
            limits[name].setdefault(m.group(1), int(m.group(2)))
    return limits


def test_fast_memory_is_the_workgroup_storage_limit() -> None:
    # fast_memory_words must be the driver's maxComputeSharedMemorySize / 4, not a guess.
    info = approx_attn.device_info()
    if info["backend"] != "vulkan" or shutil.which("vulkaninfo") is None:
        pytest.skip("needs the Vulkan backend and vulkaninfo")
    limits = vulkan_limits().get(info["adapter"])
    if not limits or "maxComputeSharedMemorySize" not in limits:
        pytest.skip(f"vulkaninfo does not list {info['adapter']!r}")
    assert info["fast_memory_words"] == limits["maxComputeSharedMemorySize"] // 4
    assert info["max_storage_buffer_binding_size"] <= limits["maxStorageBufferRange"]


def test_report_uses_the_device_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    monkeypatch.delenv("APPROX_ATTN_FAST_MEMORY_BYTES", raising=False)
    x = np.ones((4, 8), np.float32)
    _, rep = attention(x, x, x, return_report=True)
    info = approx_attn.device_info()
    assert rep.fast_memory_words == info["fast_memory_words"]
    assert (rep.adapter, rep.backend) == (info["adapter"], info["backend"])


def test_list_adapters() -> None:
    adapters = approx_attn.list_adapters()
    assert adapters, "no adapter listed"
    for entry in adapters:
        assert isinstance(entry, tuple) and len(entry) == 3
        assert all(isinstance(s, str) and s for s in entry), entry
    info = approx_attn.device_info()
    # The adapter in use is one of those listed, through the same backend.
    assert (info["adapter"], info["backend"]) in {(n, b.lower()) for n, b, _ in adapters}


def test_empty_cache_frees_the_kept_host_memory() -> None:
    # A call with 2 MiB inputs (read in place, no host copies) keeps pooled staging buffers
    # (transfers of at least 1 MiB: the readback of the 2 MiB output, and at least one 2 MiB
    # upload buffer: an upload may reuse the buffer of one whose copy is done); empty_cache
    # frees them and says how much (earlier tests may have left more), a second empty_cache
    # finds nothing, and the next call allocates again and gives the same output.
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2048, 128)).astype(np.float32) for _ in range(3))
    out = approx_attn.attention(q, k, v, method="exact")
    kept = out.nbytes + q.nbytes
    assert approx_attn.empty_cache() >= kept
    assert approx_attn.empty_cache() == 0
    # The compiled kernels went too (at most max_cached_pipelines are ever kept); the next
    # call compiles its kernel again and gives the same output.
    info = approx_attn.device_info()
    assert info["cached_pipelines"] == 0 and info["max_cached_pipelines"] >= 5
    again = approx_attn.attention(q, k, v, method="exact")
    assert np.array_equal(again, out)
    assert approx_attn.device_info()["cached_pipelines"] >= 1
    assert approx_attn.empty_cache() >= kept
