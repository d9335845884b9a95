"""Per-pass GPU times of one configuration (a profiling aid, not a benchmark).

    python benches/passes.py poly 65536 64 --tensor-cores
    python benches/passes.py exact 65536 64

Runs one warm-up call and three timed calls of 8 heads, n x n, head dimension E (the inputs of
bench.py's make_inputs at beta = 0.6), and prints the median kernel time and the median of each
pass's GPU timestamps with the plan. Shaders run with wgpu's runtime checks off (as `bench.py
--trusted`; tiles are tuned and cached for that mode). Where PyTorch with CUDA is present, a CUDA context is created first: on the H100 the
driver dropped the SM clock to idle within seconds in processes without one, even while our Vulkan
kernels ran (see benches/RESULTS.md, Clocks).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from approx_attn import _core
from bench import make_inputs  # benches/ is on sys.path when this file is run


def profiling_inputs(n: int, e: int, heads: int) -> tuple[dict, list]:
    """bench.py's inputs at beta = 0.6 and their flat q, k, v, after creating a CUDA context where
    PyTorch with CUDA is present (it holds the SM clock up, see the docstring)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
    except ImportError:
        pass
    inp = make_inputs(n, e, heads, 0.6, seed=0)
    return inp, [inp[x].reshape(-1) for x in "qkv"]


def median_passes(reps: list[dict], skip: tuple[str, ...] = ()) -> str:
    """The median GPU time of each pass over the reports, as `name=1.23ms ...`."""
    passes: dict[str, list[float]] = {}
    for rep in reps:
        for name, secs in rep["pass_s"]:
            passes.setdefault(name, []).append(secs)
    return " ".join(
        f"{a}={statistics.median(b) * 1e3:.2f}ms" for a, b in passes.items() if a not in skip
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("method", choices=["exact", "poly"])
    p.add_argument("n", type=int)
    p.add_argument("E", type=int)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tensor-cores", action="store_true", help="require the coop poly passes")
    args = p.parse_args()
    h, n, e = args.heads, args.n, args.E
    inp, (q, k, v) = profiling_inputs(n, e, h)

    out = np.empty(h * n * e, dtype=np.float32)

    def call() -> dict:
        rep = _core.attention(
            q, k, v, out, h, 1, n, n, e, e, False, inp["scale"], args.method, 1e-2,
            2 if args.method == "poly" else None, False, True, False,
            True if args.tensor_cores else None,
        )  # fmt: skip
        return rep

    call()
    reps = [call() for _ in range(3)]
    kernel = statistics.median(r["kernel_s"] for r in reps)
    print(f"{args.method} n={n} E={e}: kernel {kernel:.4f} s; {median_passes(reps)}")
    print(f"plan: {reps[-1]['plan']}")


if __name__ == "__main__":
    main()
