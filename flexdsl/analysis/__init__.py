"""Symbolic analysis of a checked spec: index and value ranges, and tile plans."""
from .ranges import (EvaluatedCheck, IndexRange, ValueRange, checked_by_evaluation,
                     index_ranges, value_ranges)

__all__ = ["EvaluatedCheck", "IndexRange", "ValueRange", "checked_by_evaluation", "index_ranges", "value_ranges"]
