"""The longest functions under src/ (lines from `fn` to its closing brace): python3
scripts/longest_functions.py [count]. The project keeps them near 100 lines or below, numerical
recipes that carry their specification excepted."""

from __future__ import annotations

import glob
import re
import sys


def lengths() -> list[tuple[int, str, str]]:
    rows = []
    for f in glob.glob("src/**/*.rs", recursive=True):
        with open(f) as fh:
            lines = fh.read().split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)(?:pub(?:\([a-z]+\))? )?(?:const )?(?:unsafe )?fn (\w+)", line)
            if not m:
                continue
            end = i
            for j in range(i, len(lines)):
                end = j
                if lines[j] == m.group(1) + "}" or (j == i and line.rstrip().endswith(";")):
                    break
            rows.append((end - i + 1, f, m.group(2)))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    for n, f, name in lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 10]:
        print(n, f, name)
