"""Two training processes (DDP over gloo on the CPU) against one, at the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "check_distributed_training.py"), "--nproc", "2", "--steps", "6",
         "--tolerance", "0.1", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and "MULTI_CPU" in result["distributed_type"]
    assert len(result["losses_parallel"]) == len(result["losses_single"]) == 6
    assert result["relative_difference"] <= 0.1
    assert result["adapter_effect"]["single"] > 0 and result["adapter_effect"]["parallel"] > 0
