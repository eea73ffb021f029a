"""mcserve kernels: Triton kernels beside their torch references (docs/design.md section 3)."""

import os


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
