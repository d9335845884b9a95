"""Every failure of the `approx-attn` command: one clear line on stderr, exit status 2, no
traceback; the output path printed is the file written, exactly as given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from approx_attn import cli


def inputs(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(5)
    args = []
    for name in ("q", "k", "v"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((2, 9, 8)).astype(np.float32))
        args += [f"--{name}", str(tmp_path / f"{name}.npy")]
    return ["run", *args, "--method", "exact"]


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("approx-attn: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + captured.out
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def replace_q(argv: list[str], path: Path) -> list[str]:
    argv = list(argv)
    argv[argv.index("--q") + 1] = str(path)
    return argv


# Bad input files


def test_empty_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "empty.npy"
    bad.write_bytes(b"")
    argv = replace_q(inputs(tmp_path), bad) + ["-o", str(tmp_path / "o.npy")]
    fails(argv, capsys, f"--q {bad}: not a readable .npy array (the file is empty)")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    "content",
    [
        b"not an npy file at all",
        b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4',",  # header cut short
        "truncated",
        "pickled",
    ],
    ids=["garbage", "bad-header", "truncated", "pickled"],
)
def test_malformed_npy(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: object) -> None:
    bad = tmp_path / "bad.npy"
    if content == "truncated":
        np.save(bad, np.ones((64, 64), np.float32))
        bad.write_bytes(bad.read_bytes()[:500])
    elif content == "pickled":
        np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        assert isinstance(content, bytes)
        bad.write_bytes(content)
    argv = replace_q(inputs(tmp_path), bad) + ["-o", str(tmp_path / "o.npy")]
    fails(argv, capsys, f"--q {bad}: not a readable .npy array (")


def test_npz_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "arrays.npz"
    np.savez(bad, q=np.ones((4, 8), np.float32))
    argv = replace_q(inputs(tmp_path), bad) + ["-o", str(tmp_path / "o.npy")]
    fails(argv, capsys, "not a .npy array (an .npz archive?)")


def test_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = replace_q(inputs(tmp_path), tmp_path / "nope.npy") + ["-o", str(tmp_path / "o.npy")]
    fails(argv, capsys, "--q ", "nope.npy: No such file or directory")


def test_input_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = replace_q(inputs(tmp_path), tmp_path) + ["-o", str(tmp_path / "o.npy")]
    fails(argv, capsys, "--q ")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"dtype": np.int32}, "TypeError: query must be a floating-point array"),
        ({"shape": (2, 9, 7)}, "ValueError: query and key must have the same head dimension"),
        ({"nan": True}, "ValueError: query contains 1 NaN or Inf"),
    ],
    ids=["dtype", "shape", "nan"],
)
def test_bad_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, fragment: str
) -> None:
    argv = inputs(tmp_path) + ["-o", str(tmp_path / "o.npy")]
    q = np.ones(change.get("shape", (2, 9, 8)), change.get("dtype", np.float32))
    if change.get("nan"):
        q[0, 0, 0] = np.nan
    np.save(tmp_path / "q.npy", q)
    fails(argv, capsys, fragment)


def test_causal_poly_that_cannot_certify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Standard normal q and k at E = 8 give beta of about 4: no usable degree certifies there.
    argv = inputs(tmp_path) + ["-o", str(tmp_path / "o.npy"), "--causal"]
    argv[argv.index("--method") + 1] = "poly"
    fails(argv, capsys, "ValueError: the polynomial method cannot certify")


@pytest.mark.parametrize(
    "extra",
    [["--eps", "2"], ["--eps", "x"], ["--degree", "-1"], ["--method", "fast"]],
    ids=["eps-range", "eps-text", "degree", "method"],
)
def test_bad_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(inputs(tmp_path) + ["-o", str(tmp_path / "o.npy"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and extra[0] in err and "Traceback" not in err


# The output path


@pytest.mark.parametrize("name", ["out_nosuffix", "out.bin", "out.npy"])
def test_output_written_exactly_where_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    out = tmp_path / name
    assert cli.main(inputs(tmp_path) + ["-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (2, 9, 8) float32\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["k.npy", "q.npy", "v.npy", name])
    assert np.load(out).shape == (2, 9, 8)


def test_output_path_printed_is_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result"
    assert cli.main(inputs(tmp_path) + ["-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == f"wrote {out} (2, 9, 8) float32"
    assert out.is_file() and not (tmp_path / "result.npy").exists()


def test_output_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    some_dir = tmp_path / "some_dir"
    some_dir.mkdir()
    fails(inputs(tmp_path) + ["-o", str(some_dir)], capsys, f"-o {some_dir}: is a directory")
    assert not (tmp_path / "some_dir.npy").exists()


def test_output_in_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "missing" / "o.npy"
    fails(inputs(tmp_path) + ["-o", str(out)], capsys, "does not exist")


# approx-attn io

IO = ["io", "--min-log2", "10", "--max-log2", "11", "--fast-memory-kib", "16", "--no-measure"]


def test_io_without_matplotlib_prints_tables_and_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    monkeypatch.chdir(tmp_path)
    assert cli.main(IO) == 0  # the default plot: the tables are the product
    captured = capsys.readouterr()
    assert "M = 16 KiB" in captured.out and "2^11" in captured.out
    assert captured.err.startswith("approx-attn: note: matplotlib is not installed")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not (tmp_path / "io.png").exists()


def test_io_plot_asked_for_without_matplotlib_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "plot.png"
    err = fails([*IO, "--plot", str(png)], capsys, "matplotlib is not installed", str(png))
    assert "approx_attn[plot]" in err and not png.exists()


def test_io_tables_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main([*IO, "--plot", ""]) == 0
    captured = capsys.readouterr()
    assert "M = 16 KiB" in captured.out and "wrote" not in captured.out and captured.err == ""


def test_io_plot_written_exactly_where_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "io_plot"
    assert cli.main([*IO, "--plot", str(plot)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {plot}")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["io_plot"]


def test_io_plot_into_a_directory_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails([*IO, "--plot", str(tmp_path)], capsys, "is a directory")


@pytest.mark.parametrize(
    "extra",
    [
        ["--min-log2", "12", "--max-log2", "11"],
        ["--min-log2", "-1"],
        ["--fast-memory-kib", "0"],
        ["--E", "0"],
    ],
    ids=["empty-range", "negative", "M0", "E0"],
)
def test_io_bad_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*IO, *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["demo", "--n", "0"], ["demo", "--eps", "1"]])
def test_demo_bad_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


def test_console_failure_has_no_traceback(tmp_path: Path) -> None:
    # The whole process: an empty .npy, exit status 2, one line on stderr.
    bad = tmp_path / "empty.npy"
    bad.write_bytes(b"")
    argv = replace_q(inputs(tmp_path), bad) + ["-o", str(tmp_path / "o.npy")]
    res = subprocess.run(
        [sys.executable, "-m", "approx_attn.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")},
        timeout=120,
    )
    assert res.returncode == 2, res
    assert res.stderr.startswith("approx-attn: --q ") and res.stderr.count("\n") == 1, res.stderr
    assert res.stdout == ""
