"""The decoding example of docs/poly-kernel.md runs as written (in a temporary directory: it
writes a file). The README's main example is the CLI demo's job (tests/test_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "poly-kernel.md"


def test_decoding_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "state.step(" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(DOC), "exec"), {"__name__": "docs"})  # noqa: S102
    # It prints the state's size, which the comment beside it states.
    nbytes = int(capsys.readouterr().out)
    assert f"{nbytes:,}" in block
    assert (tmp_path / "state.npy").exists()
