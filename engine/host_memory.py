"""Keep freed host memory in the process, so that a steady decode loop stops faulting pages in.

glibc's malloc serves large blocks with mmap and raises that threshold as they are freed, and it
hands the top of the heap back to the kernel once more than a threshold of it is free. A loop that
allocates and frees the same few megabytes of tensors every step can land on the wrong side of
both: every step then maps, faults and unmaps its activations again. Measured on the bundled model
at batch 32 (benchmarks/structured_decode.py): 1.5 million minor faults per run, a third of the
CPU time in the kernel, and decode at half speed, set off by nothing more than another request
mix having run before. Fixed thresholds end it (vLLM's CPU images preload tcmalloc for the same
reason); the cost is that the resident set stays at its high-water mark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20    # glibc's own ceiling for its moving threshold
TRIM_THRESHOLD = 512 << 20   # free memory at the top of the heap kept before any is returned


@functools.cache
def hold_freed_memory() -> bool:
    """Fix malloc's thresholds for this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
