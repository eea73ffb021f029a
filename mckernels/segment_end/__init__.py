"""Segment end: copy the online states of the rows whose segment just ended into their checkpoint
blocks (and restart them at zero for `reset` boundaries)."""

from .reference import segment_end_ref

__all__ = ["segment_end_ref"]
