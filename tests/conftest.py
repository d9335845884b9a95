"""Test-wide settings: no autotune (plans stay the planner's defaults, runs stay deterministic).

The suite runs on whichever wgpu backend APPROX_ATTN_BACKEND picks (CI: Vulkan, then GL); the
header names it. A test that needs an optional adapter feature says so with
``@pytest.mark.needs_feature("timestamp_queries")`` (a key of `approx_attn.device_info()`, e.g.
shader_f16, subgroups, cooperative_matrix) and is skipped, with the backend named, where it lacks it.
"""

import os

import pytest

os.environ.setdefault("APPROX_ATTN_AUTOTUNE", "0")


def _device_info() -> dict:
    import approx_attn

    try:
        return approx_attn.device_info()
    except RuntimeError as e:  # NoDeviceError, DeviceError: the tests report them themselves
        return {"error": f"{type(e).__name__}: {e}"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_feature(name): skip unless device_info()[name] is true on this backend"
    )


def pytest_report_header(config: pytest.Config) -> str:
    info = _device_info()
    if "error" in info:
        return f"approx_attn adapter: none ({info['error']})"
    flags = ("shader_f16", "subgroups", "timestamp_queries", "cooperative_matrix")
    have = ", ".join(f for f in flags if info.get(f)) or "none"
    return f"approx_attn adapter: {info['adapter']} via {info['backend']} (features: {have})"


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_feature"):
        info = _device_info()
        for name in mark.args:
            if not info.get(name):
                pytest.skip(
                    f"needs {name}, which {info.get('adapter', 'the adapter')} lacks on the "
                    f"{info.get('backend', '?')} backend"
                )
