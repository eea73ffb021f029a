"""mcserve kernels: Triton kernels beside their torch references (DESIGN.md section 3)."""
