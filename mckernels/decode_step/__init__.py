"""Fused decode step: in-place online-state update and read-out for a batch of slots."""

from .reference import decode_step_ref

__all__ = ["decode_step_ref"]
