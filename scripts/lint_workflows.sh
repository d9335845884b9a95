#!/usr/bin/env bash
# Lints .github/workflows/*.yml: GitHub's workflow schema (check-jsonschema), zizmor's audits
# (expressions, permissions, credentials, pinning; settings in .github/zizmor.yml), and every
# `run:` block through ShellCheck as actionlint does (Debian's package `shellcheck`; skipped if
# absent), with scripts/*.sh too. actionlint itself cannot be installed here: its PyPI wrapper
# downloads the binary from GitHub at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q check-jsonschema zizmor
shopt -s nullglob
workflows=(.github/workflows/*.yml)
[ ${#workflows[@]} -gt 0 ] || { echo "lint_workflows: no workflow files" >&2; exit 1; }

.venv/bin/check-jsonschema --builtin-schema vendor.github-workflows "${workflows[@]}"
.venv/bin/zizmor --offline --quiet .github/workflows/

if command -v shellcheck >/dev/null; then
    blocks=$(mktemp -d)
    trap 'rm -rf "$blocks"' EXIT
    .venv/bin/python - "$blocks" "${workflows[@]}" <<'EOF'
import re
import sys
from pathlib import Path

from ruamel.yaml import YAML

out = Path(sys.argv[1])
for wf in sys.argv[2:]:
    doc = YAML(typ="safe").load(Path(wf).read_text())
    for job_id, job in doc["jobs"].items():
        for i, step in enumerate(job.get("steps", [])):
            if "run" in step:
                # ${{ expressions }} are substituted before the shell sees the script.
                body = re.sub(r"\$\{\{.*?\}\}", "EXPR", step["run"])
                name = f"{Path(wf).stem}.{job_id}.{i}.sh"
                (out / name).write_text("#!/usr/bin/env bash\nset -e\n" + body)
EOF
    shellcheck "$blocks"/*.sh scripts/*.sh
else
    echo "lint_workflows: shellcheck not installed (apt-get install shellcheck); run blocks unchecked" >&2
fi
echo "lint_workflows: ${workflows[*]} clean"
