"""The `approx-attn` command: devices, run, demo, io (small sizes; lavapipe is slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from approx_attn import cli
from approx_attn.reference import exact_attention


def test_devices_lists_the_adapter_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "in use:" in out and "fast_memory_words" in out


def test_run_writes_the_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 33, 8)).astype(np.float32) for _ in range(3))
    for name, arr in (("q", q), ("k", k), ("v", v)):
        np.save(tmp_path / f"{name}.npy", arr)
    out_path = tmp_path / "o.npy"
    argv = ["run", "--q", str(tmp_path / "q.npy"), "--k", str(tmp_path / "k.npy")]
    argv += ["--v", str(tmp_path / "v.npy"), "-o", str(out_path), "--causal", "--method", "exact"]
    assert cli.main(argv) == 0
    out = np.load(out_path)
    # float32 accumulation over 33 keys of values in a range of ~8: a few 1e-6 is float noise.
    assert np.abs(out - exact_attention(q, k, v, is_causal=True)).max() < 1e-5
    assert "method exact" in capsys.readouterr().out


def test_run_reports_bad_input_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "q.npy", np.zeros((4, 8), np.float32))
    np.save(tmp_path / "k.npy", np.zeros((5, 7), np.float32))
    np.save(tmp_path / "v.npy", np.zeros((5, 7), np.float32))
    argv = ["run", "--q", str(tmp_path / "q.npy"), "--k", str(tmp_path / "k.npy")]
    argv += ["--v", str(tmp_path / "v.npy"), "-o", str(tmp_path / "o.npy")]
    assert cli.main(argv) == 2
    assert "ValueError" in capsys.readouterr().err


def test_demo_prints_both_methods_with_bound_and_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--n", "256", "--heads", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("exact", "poly", "auto", "max |O-O*|", "certified", "I/O words"):
        assert word in out


def test_io_prints_table_and_writes_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "io.png"
    argv = ["io", "--min-log2", "10", "--max-log2", "14", "--fast-memory-kib", "16", "48"]
    argv += ["--plot", str(png), "--measure-max-log2", "9"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "M = 16 KiB" in out and "M = 48 KiB" in out and "2^14" in out
    assert png.stat().st_size > 10_000


def test_console_script_entry_point() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "approx_attn.cli", "--help"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "demo" in res.stdout
