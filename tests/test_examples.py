"""The runnable examples still run (smoke-test mode)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["pyro_alignment.py", "structured_attention.py"])
def test_example_runs_in_smoke_test_mode(script, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke-test"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
             "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
