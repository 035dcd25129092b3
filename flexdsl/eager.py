"""Spec expressions evaluated with torch ops on broadcast position grids.

The dense reference evaluates a spec over the whole (B, H, Sq, Skv) grid; the CPU path evaluates
it over one tile at a time. Both use this evaluator, so it is written for clarity, not speed:
every leaf becomes a tensor, int values are int64 and float values take ``float_dtype``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from . import ir
from .errors import SpecCallError


@dataclass
class Grid:
    """The values of the free names for one evaluation.

    ``positions`` maps b, h, q, kv (and q_len, kv_len) to int64 tensors that broadcast against
    each other; ``score`` is the scaled q·kᵀ on the same grid, if the expression needs it.
    """
    positions: Mapping[str, torch.Tensor]
    params: Mapping[str, float | int]
    tensors: Mapping[str, torch.Tensor]
    float_dtype: torch.dtype
    score: torch.Tensor | None = None
    spec_text: str = ""
    # Where the mask keeps a position: elsewhere the arguments of log, sqrt, exp, a divisor
    # and a power's base read 1, so that a masked position's gradient is 0, not 0 * inf.
    keep: torch.Tensor | None = None


def evaluate(node: ir.Expr, grid: Grid) -> torch.Tensor:
    """The value of ``node`` on ``grid``: int64, bool or ``grid.float_dtype``."""
    return _Evaluator(grid).visit(node)


def with_mask(mask: ir.Expr, grid: Grid) -> Grid:
    """``grid`` with ``keep`` set to the mask's value: the mask goes first, so that where it
    drops a position what is evaluated next reads harmless values (``Grid.keep``)."""
    return dataclasses.replace(grid, keep=evaluate(mask, grid))


def masked_scores(spec: ir.Spec, grid: Grid, *, mask: bool = True) -> torch.Tensor:
    """The spec's score on ``grid`` (shaped like ``grid.score``), -inf where the mask drops a
    position. ``mask=False``: a block the caller knows the mask keeps whole."""
    if mask and spec.mask is not None:
        grid = with_mask(spec.mask, grid)
    scores = evaluate(spec.score, grid).to(grid.float_dtype).expand_as(grid.score)
    return scores if grid.keep is None else scores.masked_fill(~grid.keep, -math.inf)


def _log2(x: torch.Tensor) -> torch.Tensor:
    # torch.log2 on CUDA can miss a power of two by an ulp (float64 log2(8) gave
    # 2.9999999999999996 on an H200), which floor() turns into the bucket below. A power of
    # two's value is set to its exponent, the gradient left as log2's. (exp2 of an integer
    # is exact; frexp would say it too, but inductor's C++ fails to compile it in float64.)
    estimate = torch.log2(x)
    nearest = torch.round(estimate.detach())
    power = (torch.exp2(nearest) == x.detach()) & torch.isfinite(nearest)
    return estimate + torch.where(power, nearest - estimate.detach(), 0.0)


def rounded_log2(x: torch.Tensor, f: str) -> torch.Tensor:
    """floor or ceil of log2(x), exact: exp2 of an integer is exact, so a power of two checks
    the floor of the estimate and moves it by one where log2 rounded across an integer; the
    ceiling is the floor, plus one unless x is that power of two."""
    e = torch.floor(torch.log2(x))
    p = torch.exp2(e)
    e = torch.where(p > x, e - 1, torch.where(2 * p <= x, e + 1, e))
    return e if f == "floor" else torch.where(torch.exp2(e) == x, e, e + 1)


_FLOAT_FUNCTIONS = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": _log2,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
}
_COMPARISONS = {"==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le,
                ">": torch.gt, ">=": torch.ge}


class _Evaluator:
    def __init__(self, grid: Grid):
        self.grid = grid
        some = next(iter(grid.positions.values()))
        self.device = some.device

    def scalar(self, value) -> torch.Tensor:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        dtype = torch.int64 if isinstance(value, int) else self.grid.float_dtype
        return torch.tensor(value, dtype=dtype, device=self.device)

    def floating(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.to(self.grid.float_dtype)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """x where the mask keeps the position, 1 elsewhere (see Grid.keep)."""
        keep = self.grid.keep
        return x if keep is None else torch.where(keep, x, torch.ones((), dtype=x.dtype,
                                                                      device=x.device))

    def visit(self, node: ir.Expr) -> torch.Tensor:
        return getattr(self, "visit_" + type(node).__name__)(node)

    def visit_Num(self, node):
        return self.scalar(node.value)

    def visit_Const(self, node):
        return self.scalar(float(ir.CONSTANTS[node.name]))

    def visit_Name(self, node):
        if node.id == ir.SCORE:
            return self.grid.score
        if node.id in self.grid.positions:
            return self.grid.positions[node.id]
        return self.scalar(self.grid.params[node.id])

    def visit_Lookup(self, node):
        table = self.grid.tensors[node.tensor]
        indices = [self.visit(i) for i in node.indices]
        keep = self.grid.keep
        for dim, (index, expression) in enumerate(zip(indices, node.indices)):
            # Only where the mask keeps a position must an index be in range.
            index = kept_values(index, keep)
            if index.numel() == 0:
                continue
            check_index(node, dim, int(index.min()), int(index.max()), table.shape[dim],
                        self.grid.spec_text)
        if keep is not None and table.numel():   # dropped positions read any element
            indices = [i.clamp(0, size - 1) for i, size in zip(indices, table.shape)]
        indices = torch.broadcast_tensors(*indices)
        value = table[tuple(indices)]
        return value if not value.is_floating_point() else value.to(self.grid.float_dtype)

    def visit_Unary(self, node):
        operand = self.visit(node.operand)
        return torch.logical_not(operand) if node.op == "not" else torch.neg(operand)

    def visit_Binary(self, node):
        left, right = self.visit(node.left), self.visit(node.right)
        op = node.op
        if op == "and":
            return torch.logical_and(left, right)
        if op == "or":
            return torch.logical_or(left, right)
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        if op == "/":
            return self.floating(left) / self.kept(self.floating(right))
        if op in ("//", "%"):
            right = self.kept(right)   # a divisor of 0 where the mask drops the position is not
            if bool((right == 0).any()):
                raise division_by_zero(node, self.grid.spec_text)
            if op == "//":
                return torch.div(left, right, rounding_mode="floor")
            return torch.remainder(left, right)
        if op == "**":
            exact = isinstance(node.right, ir.Num) and isinstance(node.right.value, int)
            if exact and not left.is_floating_point():
                return torch.pow(left, right)
            return torch.pow(self.kept(self.floating(left)), self.floating(right))
        raise AssertionError(op)

    def visit_Compare(self, node):
        values = [self.visit(o) for o in node.operands]
        result = None
        for op, left, right in zip(node.ops, values, values[1:]):
            part = _COMPARISONS[op](left, right)
            result = part if result is None else torch.logical_and(result, part)
        return result

    def visit_Call(self, node):
        f = node.func
        inner = node.args[0] if node.args else None
        if f in ("floor", "ceil") and isinstance(inner, ir.Call) and inner.func == "log2":
            # As the kernels do it: the estimate moved to the integer whose power of two
            # bounds x (float32 log2(2**21 - 1) rounds to 21, whose floor is one too high).
            x = self.kept(self.floating(self.visit(inner.args[0])))
            return rounded_log2(x, f).to(torch.int64)
        args = [self.visit(a) for a in node.args]
        if f in _FLOAT_FUNCTIONS:
            return _FLOAT_FUNCTIONS[f](self.kept(self.floating(args[0])))
        if f == "abs":
            return torch.abs(args[0])
        if f in ("floor", "ceil"):
            x = args[0]
            if not x.is_floating_point():
                return x
            return (torch.floor(x) if f == "floor" else torch.ceil(x)).to(torch.int64)
        args = _promote(args)
        if f == "min":
            out = args[0]
            for a in args[1:]:
                out = torch.minimum(out, a)
            return out
        if f == "max":
            out = args[0]
            for a in args[1:]:
                out = torch.maximum(out, a)
            return out
        if f == "clamp":
            x, low, high = args
            return torch.minimum(torch.maximum(x, low), high)
        raise AssertionError(f)

    def visit_IfElse(self, node):
        test, then, orelse = self.visit(node.test), self.visit(node.then), self.visit(node.orelse)
        then, orelse = _promote([then, orelse])
        return torch.where(test, then, orelse)


def kept_values(value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``value``'s elements at the positions ``keep`` keeps (all of them without a mask)."""
    if keep is None:
        return value
    shape = torch.broadcast_shapes(value.shape, keep.shape)
    return value.expand(shape)[keep.expand(shape)]


def check_index(lookup: ir.Lookup, dim: int, low: int, high: int, size: int,
                spec_text: str) -> None:
    """Raise unless [low, high], the values of ``lookup``'s index ``dim``, lie in its size."""
    if low < 0 or high >= size:
        raise SpecCallError(
            f"index out of range: {ir.unparse(lookup)} reaches {low if low < 0 else high} in "
            f"dimension {dim}, whose size is {size}", spec=spec_text,
            span=lookup.indices[dim].span,
            hint=f"pass a larger '{lookup.tensor}', or keep the index in range")


def division_by_zero(division: ir.Binary, spec_text: str) -> SpecCallError:
    return SpecCallError(f"division by zero in '{ir.unparse(division)}'", spec=spec_text,
                         span=division.right.span,
                         hint="check the parameters passed for this spec")


def _promote(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """One dtype for torch.minimum / maximum / where, as Python's arithmetic would pick."""
    dtype = values[0].dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return [v.to(dtype) for v in values]


def positions(batch: int, heads: int, q_len: int, kv_len: int, device,
              q_start: int = 0, q_stop: int | None = None,
              kv_start: int = 0, kv_stop: int | None = None) -> dict[str, torch.Tensor]:
    """b, h, q, kv as (B,1,1,1), (1,H,1,1), (1,1,M,1), (1,1,1,N) grids, and the lengths."""
    q_stop = q_len if q_stop is None else q_stop
    kv_stop = kv_len if kv_stop is None else kv_stop
    arange = lambda a, b: torch.arange(a, b, device=device, dtype=torch.int64)  # noqa: E731
    return {
        "b": arange(0, batch).view(-1, 1, 1, 1),
        "h": arange(0, heads).view(1, -1, 1, 1),
        "q": arange(q_start, q_stop).view(1, 1, -1, 1),
        "kv": arange(kv_start, kv_stop).view(1, 1, 1, -1),
        "q_len": torch.tensor(q_len, device=device),
        "kv_len": torch.tensor(kv_len, device=device),
    }


__all__ = ["Grid", "evaluate", "positions"]
