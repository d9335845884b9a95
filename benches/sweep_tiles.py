"""GPU times of given tiles at full size (a profiling aid, not a benchmark).

    python benches/sweep_tiles.py poly 262144 64 "8 16 128 128 32 16 1" "4 16 128 128 32 16 1"
    python benches/sweep_tiles.py exact 65536 64 "32 32 16 8 0" "64 32 16 8 0"

Each argument after the method, n and E is one tile set: for poly an APPROX_ATTN_POLY_TILES value
(bk tf rc1 b tr rc2 prefetch: pass-1 key tile, feature rows per thread row, feature rows; pass-2
query block, thread rows, S' chunk; pass-1 register prefetch), for exact an
APPROX_ATTN_EXACT_TILES value (bq bk tq tk split_v: query tile, key tile, thread grid, V in its
own double-buffered tile). The autotune times candidates on a smaller problem, where wave
quantisation can rank them differently than at full size; this times them on the real one.
8 heads, degree 2, the inputs of bench.py's make_inputs at beta = 0.6; per tile set one warm-up
call (it compiles) and `--repeats` timed ones, medians printed.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from approx_attn import _core
from passes import median_passes, profiling_inputs  # benches/ is on sys.path when run

TILES_VAR = {"poly": "APPROX_ATTN_POLY_TILES", "exact": "APPROX_ATTN_EXACT_TILES"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("method", choices=sorted(TILES_VAR))
    p.add_argument("n", type=int)
    p.add_argument("E", type=int)
    p.add_argument("tiles", nargs="+", help="APPROX_ATTN_POLY_TILES or _EXACT_TILES values")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    h, n, e = args.heads, args.n, args.E
    inp, (q, k, v) = profiling_inputs(n, e, h)
    degree = 2 if args.method == "poly" else None

    out = np.empty(h * n * e, dtype=np.float32)

    def call() -> dict:
        rep = _core.attention(
            q, k, v, out, h, 1, n, n, e, e, False, inp["scale"], args.method, 1e-2, degree,
            False, True, False, False if args.method == "poly" else None,
        )  # fmt: skip
        return rep

    for tiles in args.tiles:
        os.environ[TILES_VAR[args.method]] = tiles
        try:
            call()
        except Exception as err:  # noqa: BLE001 - report and go on with the next tile set
            print(f"{tiles}: {err}")
            continue
        reps = [call() for _ in range(args.repeats)]
        kernel = statistics.median(r["kernel_s"] for r in reps)
        passes = median_passes(reps, skip=("reduce",))
        print(f"[{tiles}] n={n} E={e}: kernel {kernel:.4f} s; {passes}", flush=True)


if __name__ == "__main__":
    main()
