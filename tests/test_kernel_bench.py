"""The kernel benchmark's correctness gate runs (interpreter on the CPU): it refuses to time
kernels that disagree with their references."""

import subprocess
import sys


def test_kernel_bench_quick_checks_then_reports():
    res = subprocess.run([sys.executable, "-m", "kernels.bench", "--quick"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| decode_step") or line.startswith("| cached")]
    assert len(rows) == 5


def test_end_to_end_bench_quick_checks_then_reports():
    res = subprocess.run([sys.executable, "-m", "kernels.bench_e2e", "--quick", "--aggregations", "ssc"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ssc top-2 |")]
    assert len(rows) == 4
