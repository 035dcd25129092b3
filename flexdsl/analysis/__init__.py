"""Symbolic analysis of a checked spec: index and value ranges, and tile plans."""
from .ranges import (IndexRange, ValueRange, checked_by_evaluation, index_ranges,
                     value_ranges)

__all__ = ["IndexRange", "ValueRange", "checked_by_evaluation", "index_ranges", "value_ranges"]
