"""Symbolic analysis of a checked spec: index ranges and tile plans."""
from .ranges import IndexRange, ValueRange, index_ranges, checked_by_evaluation, value_ranges

__all__ = ["IndexRange", "ValueRange", "index_ranges", "checked_by_evaluation", "value_ranges"]
