"""hold_freed_memory: a loop that allocates and frees the same tensors stops faulting pages in."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys, torch
    from engine.host_memory import hold_freed_memory
    if sys.argv[1] == "held":
        assert hold_freed_memory()
    def churn():
        for _ in range(20):
            xs = [torch.ones(25_000) for _ in range(80)]  # 100 KB each, under the mmap threshold: 8 MB of heap
            while xs:
                xs.pop()                                  # freed from the top down, as a step's temporaries
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_held_memory_is_reused_without_page_faults():
    # By default the 8 MB freed at the top of the heap exceed glibc's trim threshold and go back to
    # the kernel, to be faulted in again next round (~2,000 pages a round); held, they are reused.
    assert minor_faults("default") > 10_000
    assert minor_faults("held") < 1_000
