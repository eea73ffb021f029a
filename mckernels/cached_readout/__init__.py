"""Cached read-out: score a sequence's checkpoints through its block table and read them out."""

from .reference import MODES, cached_readout_ref

__all__ = ["MODES", "cached_readout_ref"]
