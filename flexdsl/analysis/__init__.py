"""Symbolic analysis of a checked spec: index ranges and tile plans."""
from .ranges import IndexRange, index_ranges

__all__ = ["IndexRange", "index_ranges"]
