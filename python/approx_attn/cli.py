"""The `approx-attn` command: devices, run, demo, io."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

from . import _core, attention, device_info, io_cost, io_lower_bound, list_adapters
from .reference import exact_attention


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_devices(_: argparse.Namespace) -> int:
    for name, backend, kind in list_adapters():
        print(f"{name}  [{backend}, {kind}]")
    info = device_info()
    print("\nin use:")
    for key, val in info.items():
        print(f"  {key:40s} {val}")
    return 0


class CliError(Exception):
    """A failure the command reports in one line (exit status 2)."""


def _load_npy(path: str, flag: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            arr = np.load(f, allow_pickle=False)
    except OSError as exc:  # missing, unreadable, a directory
        raise CliError(f"{flag} {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # empty, truncated, pickled, a bad header: any of them
        why = "the file is empty" if os.path.getsize(path) == 0 else str(exc) or type(exc).__name__
        raise CliError(f"{flag} {path}: not a readable .npy array ({why})") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise CliError(f"{flag} {path}: not a .npy array (an .npz archive?)")
    return arr


def _check_output_path(path: str) -> None:
    """Fails before the computation when the output cannot be written where asked."""
    if os.path.isdir(path):
        raise CliError(f"-o {path}: is a directory; give a file name")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise CliError(f"-o {path}: directory {parent} does not exist")


def cmd_run(args: argparse.Namespace) -> int:
    _check_output_path(args.output)
    q, k, v = (_load_npy(p, f) for p, f in ((args.q, "--q"), (args.k, "--k"), (args.v, "--v")))
    out, rep = attention(
        q,
        k,
        v,
        is_causal=args.causal,
        method=args.method,
        eps=args.eps,
        degree=args.degree,
        enable_gqa=args.gqa,
        return_report=True,
    )
    # The path as given: np.save(path) would append ".npy" to a name without it.
    with open(args.output, "wb") as f:
        np.save(f, out)
    print(f"wrote {args.output} {out.shape} {out.dtype}")
    print(f"method {rep.method} ({rep.reason}); {rep.elapsed_s:.3f} s; io_words {rep.io_words:,}")
    if rep.error_bound is not None:
        print(
            f"certified max |O - O*| <= {rep.error_bound:.3e} (degree {rep.degree}, "
            f"rank {rep.rank}, beta {rep.beta:.3f})"
        )
    return 0


def _scaled_inputs(rng: np.random.Generator, heads: int, n: int, e: int, beta: float | None):
    q = rng.standard_normal((heads, n, e)).astype(np.float32)
    k = rng.standard_normal((heads, n, e)).astype(np.float32)
    v = rng.standard_normal((heads, n, e)).astype(np.float32)
    if beta is not None:
        # Scale q and k so that scale * max|q| * max|k - mean k| equals beta.
        kc = k - k.mean(axis=-2, keepdims=True)
        now = np.linalg.norm(q, axis=-1).max() * np.linalg.norm(kc, axis=-1).max() / math.sqrt(e)
        f = math.sqrt(beta / now)
        q, k = q * f, k * f
    return q, k, v


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line)] + body)


def cmd_demo(args: argparse.Namespace) -> int:
    info = device_info()
    print(
        f"approx_attn demo on {info['adapter']} ({info['backend']}), fast memory "
        f"{info['fast_memory_words']} words\n"
    )
    rng = np.random.default_rng(0)
    workloads = [
        (
            "bounded scores (beta = 0.5), where the polynomial method pays",
            args.heads,
            args.n,
            16,
            0.5,
        ),
        (
            "softmax-like scores (standard normal, beta ~ 10), where it does not",
            args.heads,
            args.n // 2,
            64,
            None,
        ),
    ]
    for title, heads, n, e, beta in workloads:
        q, k, v = _scaled_inputs(rng, heads, n, e, beta)
        _progress(f"[demo] {title}: {heads} heads, L = S = {n}, E = {e}; float64 reference ...")
        ref = exact_attention(q, k, v)
        vrange = float(v.max() - v.min())
        rows = []
        for method in ("exact", "poly", "auto"):
            _progress(f"[demo]   {method} ...")
            try:
                attention(q[:, :8], k, v, method=method, eps=args.eps)  # warm-up: compile
                t0 = time.perf_counter()
                out, rep = attention(q, k, v, method=method, eps=args.eps, return_report=True)
                wall = time.perf_counter() - t0
            except ValueError as exc:
                rows.append([method, "-", "-", "-", "-", "-", f"not applicable: {exc}"[:90]])
                continue
            err = float(np.abs(out - ref).max())
            bound = "-" if rep.error_bound is None else f"{rep.error_bound:.2e}"
            detail = (
                rep.reason
                if method == "auto"
                else (
                    f"degree {rep.degree}, rank {rep.rank}, beta {rep.beta:.2f}, schedule "
                    f"{rep.schedule}"
                    if rep.method == "poly"
                    else "FlashAttention-2 tiling"
                )
            )
            kernel = "-" if rep.kernel_s is None else f"{rep.kernel_s:.3f}"
            rows.append(
                [
                    f"{method}->{rep.method}" if method == "auto" else method,
                    f"{wall:.3f}",
                    kernel,
                    f"{err:.2e}",
                    bound,
                    f"{rep.io_words:,}",
                    detail[:90],
                ]
            )
        print(
            f"{title}\n{heads} heads, L = S = {n}, E = Ev = {e}, eps = {args.eps}, "
            f"value range {vrange:.2f}"
        )
        print(
            _table(
                rows,
                ["method", "time s", "kernel s", "max |O-O*|", "certified", "I/O words", "notes"],
            )
        )
        print()
    print(
        "max |O-O*|: measured against float64 NumPy. certified: the poly method's bound "
        "(eps_P/(1-eps_P), plus the f16 rounding bound where tensor cores ran) * value range. "
        "I/O words: 4-byte words the plan moves between storage buffers and workgroup memory."
    )
    return 0


KIB = 1024


def cmd_io(args: argparse.Namespace) -> int:
    ns = [2**p for p in range(args.min_log2, args.max_log2 + 1)]
    ms = [kib * KIB // 4 for kib in args.fast_memory_kib]
    e, g = args.E, args.degree
    print(
        f"I/O words (4 bytes) between storage buffers and workgroup memory: E = Ev = {e}, "
        f"poly degree {g} (rank {_core.num_features(e, g):,}), L = S = n, one head.\n"
        "planned = counted from the plan that would run (src/io.rs); LB = reconstructed lower "
        "bound.\n"
    )
    results: dict[int, dict[str, list[float]]] = {}
    for m in ms:
        rows = []
        res: dict[str, list[float]] = {"exact": [], "poly": [], "lb": []}
        for n in ns:
            ex = io_cost(n, n, e, method="exact", fast_memory_words=m)["total"]
            po = io_cost(n, n, e, method="poly", degree=g, fast_memory_words=m)
            lb = io_lower_bound(n, n, e, degree=g, fast_memory_words=m)
            res["exact"].append(ex)
            res["poly"].append(po["total"])
            res["lb"].append(lb)
            rows.append(
                [
                    f"2^{int(math.log2(n))}",
                    f"{ex:.3e}",
                    f"{po['total']:.3e}",
                    po["schedule"],
                    f"{lb:.3e}",
                    f"{ex / po['total']:.1f}x",
                    f"{po['total'] / lb:.1f}",
                ]
            )
        results[m] = res
        print(f"M = {m * 4 // KIB} KiB ({m} words)")
        print(_table(rows, ["n", "exact", "poly", "sched", "lower bound", "exact/poly", "poly/LB"]))
        print()
    plot = args.plot if args.plot is not None else "io.png"
    if not plot:
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # The tables are the product; the plot needs the optional dependency.
        msg = (
            f"matplotlib is not installed: {plot} not written (pip install 'approx_attn[plot]', "
            "or --plot '' for the tables only)"
        )
        if args.plot is None:  # the default plot: a note, the tables succeeded
            print(f"approx-attn: note: {msg}", file=sys.stderr)
            return 0
        raise CliError(msg) from None
    _check_output_path(plot)
    measured = _measured_io(args) if args.measure else []
    _plot_io(args, plot, ns, results, measured)
    return 0


def _measured_io(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """Counted words from real runs on this adapter (the shaders count with atomics)."""
    out = []
    os.environ["APPROX_ATTN_COUNT_IO"] = "1"
    rng = np.random.default_rng(1)
    try:
        for n in [2**p for p in range(8, args.measure_max_log2 + 1)]:
            q, k, v = _scaled_inputs(rng, 1, n, args.E, 0.5)
            for method in ("exact", "poly"):
                _progress(f"[io] measuring {method} at n = {n} ...")
                kw = {"degree": args.degree} if method == "poly" else {}
                _, rep = attention(q, k, v, method=method, return_report=True, **kw)
                assert rep.io_words_counted == rep.io_words, "counted and planned words differ"
                out.append((method, n, rep.io_words_counted))
    finally:
        os.environ.pop("APPROX_ATTN_COUNT_IO", None)
    return out


def _plot_io(
    args: argparse.Namespace,
    path: str,
    ns: list[int],
    results: dict[int, Any],
    measured: list[tuple[str, int, int]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(results)))
    for (m, res), c in zip(results.items(), colors):
        kib = m * 4 // KIB
        ax.loglog(ns, res["exact"], "--", color=c, label=f"exact, M={kib} KiB")
        ax.loglog(ns, res["poly"], "-", color=c, label=f"poly g={args.degree}, M={kib} KiB")
        ax.loglog(ns, res["lb"], ":", color=c, alpha=0.7)
    for method, marker in (("exact", "s"), ("poly", "o")):
        pts = [(n, w) for m_, n, w in measured if m_ == method]
        if pts:
            ax.loglog(
                *zip(*pts),
                marker,
                color="crimson",
                ms=6,
                label=f"{method}: counted on {device_info()['adapter'][:24]}",
            )
    ax.set_xlabel("sequence length n (L = S)")
    ax.set_ylabel("words moved (slow <-> fast memory)")
    ax.set_title(f"I/O of exact vs polynomial attention, E = {args.E} (dotted: lower bound)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    # The path as given, in the format its suffix names (PNG without one): savefig(path) would
    # append ".png" to a name without a suffix.
    fmt = os.path.splitext(path)[1][1:].lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        fmt = "png"
    with open(path, "wb") as f:
        fig.savefig(f, format=fmt, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {val}")
        return val

    return parse


def _eps(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < val < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return val


def _error_name(exc: BaseException) -> str:
    # Private subclasses (approx_attn._ArgumentTypeError) by the built-in class they extend.
    for cls in type(exc).__mro__:
        if not cls.__name__.startswith("_"):
            return cls.__name__
    return type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="approx-attn", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("devices", help="list adapters and the one in use").set_defaults(fn=cmd_devices)

    run = sub.add_parser("run", help="attention on .npy files")
    run.add_argument("--q", required=True)
    run.add_argument("--k", required=True)
    run.add_argument("--v", required=True)
    run.add_argument("-o", "--output", required=True)
    run.add_argument("--causal", action="store_true")
    run.add_argument("--gqa", action="store_true", help="enable_gqa")
    run.add_argument("--method", default="auto", choices=["auto", "exact", "poly"])
    run.add_argument("--eps", type=_eps, default=1e-3)
    run.add_argument("--degree", type=_int_at_least(0), default=None)
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser("demo", help="both methods side by side on a default workload")
    demo.add_argument("--n", type=_int_at_least(1), default=4096, help="sequence length (L = S)")
    demo.add_argument("--heads", type=_int_at_least(1), default=4)
    demo.add_argument("--eps", type=_eps, default=1e-2)
    demo.set_defaults(fn=cmd_demo)

    io = sub.add_parser("io", help="I/O words of exact, poly and the lower bound; log-log plot")
    io.add_argument("--E", type=_int_at_least(1), default=64)
    io.add_argument("--degree", type=_int_at_least(0), default=2)
    io.add_argument("--min-log2", type=_int_at_least(0), default=10)
    io.add_argument("--max-log2", type=_int_at_least(0), default=24)
    io.add_argument(
        "--fast-memory-kib", type=_int_at_least(1), nargs="+", default=[16, 32, 48, 64, 228]
    )
    io.add_argument("--plot", default=None, help="plot path (default io.png; '' for none)")
    io.add_argument(
        "--no-measure",
        dest="measure",
        action="store_false",
        help="skip the counted series from real runs",
    )
    io.add_argument("--measure-max-log2", type=_int_at_least(8), default=11)
    io.set_defaults(fn=cmd_io)

    args = parser.parse_args(argv)  # usage errors: argparse's message, status 2
    if args.cmd == "io" and args.min_log2 > args.max_log2:
        parser.error(f"io: --min-log2 {args.min_log2} is above --max-log2 {args.max_log2}")
    try:
        return int(args.fn(args))
    except CliError as exc:
        print(f"approx-attn: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("approx-attn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `approx-attn io | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as exc:  # noqa: BLE001 (every failure: one line, status 2, no traceback)
        print(f"approx-attn: {_error_name(exc)}: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # a Rust panic (pyo3_runtime.PanicException) included
        if isinstance(exc, (SystemExit, GeneratorExit)):
            raise
        print(f"approx-attn: {_error_name(exc)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
