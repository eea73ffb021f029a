"""The kernel benchmark's correctness gate runs (interpreter on the CPU): it refuses to time
kernels that disagree with their references."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/ runs from a checkout: it is not installed


def test_kernel_bench_quick_checks_then_reports():
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_bench", "--quick"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    decode = [line for line in res.stdout.splitlines() if line.startswith("| decode_step")]
    cached = [line for line in res.stdout.splitlines() if line.startswith("| cached")]
    ends = [line for line in res.stdout.splitlines() if line.startswith("| segment_end")]
    prefill = [line for line in res.stdout.splitlines() if line.startswith("| chunk prefill")]
    assert len(decode) == 2 and len(cached) == 4 and len(ends) == 2 and len(prefill) == 2, res.stdout
    if importlib.util.find_spec("fla") is not None:  # fla's fused_recurrent was checked, then timed
        assert all(re.search(r"\| [\d.]+x \|$", line) for line in decode), decode


def test_end_to_end_bench_quick_checks_then_reports():
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_e2e_bench", "--quick", "--aggregations",
                          "ssc"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ssc top-2 |")]
    assert len(rows) == 4
