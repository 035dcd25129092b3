"""Scores whose bias splits into a query part and a key part: ``score + R(q) + C(kv)``.

ALiBi's ``score + slope[h] * (kv - q)`` is one: its bias is ``slope[h] * kv`` plus
``-slope[h] * q``. Only biases finite by construction split (no lookups indexed by a
position, no functions that can reach infinity). Softmax over the keys of a row ignores
whatever is added to the whole row, so the kernels add only the key part inside their loops
(one multiply-add per element, as for a plain score) and the query part once per row, to the
log-sum-exp.

No split is written down: for any position ``a``, a separable bias obeys
``B(q, kv) = B(q, a) + B(a, kv) - B(a, a)``, so the kernels evaluate the user's own
expression with one position fixed at an anchor, the middle of their tile (which keeps each
part within half a tile's width of bias, for float precision).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from ..check import CheckedSpec
from .symbolic import Symbols, to_sympy


@dataclass(frozen=True)
class SeparableBias:
    """The spec's score is ``score + bias`` and every term of ``bias`` depends on at most one
    of q and kv."""
    bias: ir.Expr


def separable_bias(spec: CheckedSpec) -> SeparableBias | None:
    """The score's bias, if the score is ``score`` plus a bias that separates; else None.

    >>> from flexdsl.check import check
    >>> ir.unparse(separable_bias(check("score + slope[h] * (kv - q)")).bias)
    'slope[h] * (kv - q)'
    >>> separable_bias(check("score - 0.1 * abs(q - kv)")) is None
    True
    >>> separable_bias(check("score + pad[b, kv]")) is None   # may hold -inf: stays whole
    True
    """
    terms = _sum_terms(spec.spec.score, 1)
    scores = [sign for node, sign in terms if node == ir.Name(ir.SCORE)]
    rest = [(node, sign) for node, sign in terms if node != ir.Name(ir.SCORE)]
    if scores != [1] or not rest or any(ir.SCORE in ir.names(node) for node, _ in rest):
        return None
    bias = None
    for node, sign in rest:
        if bias is None:
            bias = node if sign > 0 else ir.Unary("-", node)
        else:
            bias = ir.Binary("+" if sign > 0 else "-", bias, node)
    if not _finite(bias) or not _separates(bias, spec):
        return None
    return SeparableBias(bias)


def _finite(bias: ir.Expr) -> bool:
    """Whether ``bias`` is finite at every position once the values it reads are: built of
    positions, lengths, parameters, literals and lookups that no position indexes (a head's
    slope), by +, -, *, division by such values, integer // and %, abs, min, max and clamp.
    The split subtracts B at the anchor; an infinite bias at some positions only (a
    key-padding table of -inf, log(kv + 0.0) at kv = 0) would turn the other keys' scores
    into inf or nan, so such biases stay whole. A lookup by head or batch may still hold
    -inf (a head switched off): then B is infinite at every position of the program, and
    the kernels treat its rows as empty (``sep_ok``)."""
    for node in ir.walk(bias):
        if isinstance(node, ir.Lookup):
            if ir.names(*node.indices) & {"q", "kv"}:
                return False
        elif isinstance(node, ir.Binary):
            if node.op in ("**", "and", "or"):
                return False
            if node.op in ("/", "//", "%") and ir.names(node.right) & {"q", "kv"}:
                return False
        elif isinstance(node, ir.Call):
            if node.func not in ("abs", "min", "max", "clamp"):
                return False
        elif isinstance(node, ir.Const):
            if node.name == "inf":
                return False
        elif not isinstance(node, (ir.Num, ir.Name, ir.Unary)):
            return False   # conditionals (which may choose -inf), comparisons
    return True


def keeps_non_finite(bias: ir.Expr) -> bool:
    """Whether ``bias`` is non-finite wherever a value it reads is: built by +, -, * and abs
    alone (inf * 0 and inf - inf are nan; no division, min or max, which can turn an
    infinity into a finite value or a finite value into an infinity)."""
    for node in ir.walk(bias):
        if isinstance(node, ir.Binary) and node.op not in ("+", "-", "*"):
            return False
        if isinstance(node, ir.Call) and node.func != "abs":
            return False
        if isinstance(node, ir.Unary) and node.op != "-":
            return False
    return True


def _sum_terms(node: ir.Expr, sign: int) -> list[tuple[ir.Expr, int]]:
    """The terms of a chain of + and - (and negations), each with its sign."""
    if isinstance(node, ir.Binary) and node.op in ("+", "-"):
        return _sum_terms(node.left, sign) + _sum_terms(node.right,
                                                        sign if node.op == "+" else -sign)
    if isinstance(node, ir.Unary) and node.op == "-":
        return _sum_terms(node.operand, -sign)
    return [(node, sign)]


def _separates(bias: ir.Expr, spec: CheckedSpec) -> bool:
    """Whether no term of the expanded bias depends on both q and kv. A lookup depends on the
    positions its indices name; functions sympy does not expand (abs, exp, a conditional)
    keep both positions in one term, and so do not separate."""
    symbols = Symbols(spec)
    try:
        expression = sympy.expand(to_sympy(bias, symbols))
    except (TypeError, ValueError, NotImplementedError):
        return False
    q, kv = symbols["q"], symbols["kv"]

    def positions(term) -> set[str]:
        found = set()
        for free in term.free_symbols:
            if free == q:
                found.add("q")
            elif free == kv:
                found.add("kv")
            elif free in symbols.lookups:
                found |= ir.names(*symbols.lookups[free].indices) & {"q", "kv"}
        return found

    return all(positions(term) != {"q", "kv"} for term in sympy.Add.make_args(expression))


__all__ = ["SeparableBias", "keeps_non_finite", "separable_bias"]
