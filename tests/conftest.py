"""Test-wide settings: no autotune (plans stay the planner's defaults, runs stay deterministic)."""

import os

os.environ.setdefault("APPROX_ATTN_AUTOTUNE", "0")
