"""The README's decoding example runs as written (in a temporary directory: it writes a file).
The main example is the CLI demo's job (tests/test_cli.py); this one shows an API on its own."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_decoding_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "state.step(" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # noqa: S102
    # It prints the state's size, which the comment beside it states.
    nbytes = int(capsys.readouterr().out)
    assert f"{nbytes:,}" in block
    assert (tmp_path / "state.npy").exists()
