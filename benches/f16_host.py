"""Host seconds of `attention` NumPy to NumPy, float16 against float32 inputs (method exact).

Host seconds = wall seconds of the call minus Report.host_s's "wait" (the time spent waiting
for the GPU), so a CPU adapter's slow kernel does not hide the host's work. Prints and writes
JSON: min and median over --repeats calls after a warm-up. --steps times only the host steps
that float16 inputs add (the NaN/Inf check, the float32 copies, the float16 output), without a
kernel, so that shapes too large for a CPU adapter's kernel can be timed.

    python benches/f16_host.py --heads 8 --n 4096 --E 64 --repeats 5 --json out.json
"""

import argparse
import json
import statistics
import time

import approx_attn as aa
import numpy as np


def steps(x16: list[np.ndarray], out32: np.ndarray, repeats: int) -> dict:
    """Seconds (min, median) of the host steps float16 inputs add to a call."""
    f16 = np.dtype(np.float16)
    # The package before the binding converted float16 had no _to_out_dtype: NumPy's cast.
    to16 = getattr(aa, "_to_out_dtype", lambda r, d: r.astype(d))
    work = {
        "check_finite": lambda: [aa._check_finite(x, "x") for x in x16],
        "float32_copies": lambda: aa._float32_flat(*x16),
        "float16_output": lambda: to16(out32, f16),
    }
    row = {}
    for name, f in work.items():
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        row[name] = {"min": min(ts), "median": statistics.median(ts)}
        print(f"{name:15} min {min(ts):.4f} s median {statistics.median(ts):.4f} s")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--E", type=int, nargs="+", default=[64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", action="store_true", help="time the host steps only")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for e in args.E:
        shape = (1, args.heads, args.n, e)
        x32 = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
        x16 = [x.astype(np.float16) for x in x32]
        if args.steps:
            rows.append(
                steps(x16, x32[0], args.repeats) | {"heads": args.heads, "n": args.n, "E": e}
            )
            continue
        for name, xs in (("float16", x16), ("float32", x32)):
            aa.attention(*xs, method="exact")  # warm-up: device, pipelines, tiles
            walls, hosts, parts = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                _, rep = aa.attention(*xs, method="exact", return_report=True)
                wall = time.perf_counter() - t0
                host_s = dict(rep.host_s)
                walls.append(wall)
                hosts.append(wall - host_s.get("wait", 0.0))
                parts.append(host_s)
            row = {
                "dtype": name,
                "heads": args.heads,
                "n": args.n,
                "E": e,
                "storage": rep.storage,
                "wall_s": {"min": min(walls), "median": statistics.median(walls)},
                "host_s": {"min": min(hosts), "median": statistics.median(hosts)},
                "report_host_s": parts,
            }
            rows.append(row)
            print(
                f"E={e} {name:8} storage={rep.storage:8} host min {min(hosts):.4f} s "
                f"median {statistics.median(hosts):.4f} s (wall median "
                f"{statistics.median(walls):.3f} s)"
            )
    info = aa.device_info()
    doc = {"adapter": info["adapter"], "backend": info["backend"], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
