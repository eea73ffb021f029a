"""mcserve engine: scheduler, paged checkpoint store, sessions (docs/design.md section 2)."""
