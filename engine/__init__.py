"""mcserve engine: scheduler, paged checkpoint store, sessions (DESIGN.md section 2)."""
