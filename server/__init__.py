"""mcserve server: the OpenAI-compatible HTTP layer and the `mcserve` command (docs/design.md section 4)."""
