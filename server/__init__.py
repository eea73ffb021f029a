"""mcserve server: the OpenAI-compatible HTTP layer and the `mcserve` command (DESIGN.md section 4)."""
