"""Chunked prefill of a gated linear memory: online read-outs and the state at every chunk end."""

from .reference import chunk_prefill_ref, chunk_scan_terms_ref

__all__ = ["chunk_prefill_ref", "chunk_scan_terms_ref"]
