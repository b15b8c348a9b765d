"""bench/gpu_check.py's CPU smoke run: the script a GPU session runs once must not fail there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_the_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "check.md"
    cmd = [sys.executable, "bench/gpu_check.py", "--smoke", "--runs", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    text = out.read_text()
    for head in ("## 1. Per layer", "## 2. Training step", "## 3. Inference", "## 4. Top kernels"):
        assert head in text
    assert (
        "torch " in text and "device CPU" in text
    )  # the versions and the device, with the figures
    # every timed row carries a ratio: section 1 per formulation, sections 2 and 3 dense / DGC
    assert re.search(
        r"\| fp32 \| [\d.]+ \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \|", text
    )
    assert re.search(r"\| dyresnet20 \| 4 \| fp32 \| eager \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text)
    assert "skipped" not in text
