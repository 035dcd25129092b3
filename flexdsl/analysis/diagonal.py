"""Terms of the score and mask that are one value per diagonal of the attention matrix.

A relative-position bias, ``bias[h, q - kv + kv_len]``, reads one value per diagonal: a tile of
BLOCK_M queries and BLOCK_N keys holds only BLOCK_M + BLOCK_N - 1 distinct values of q - kv.
Read per element, each tile gathers BLOCK_M * BLOCK_N of them from memory, and the compiler
stages every one through shared memory (a 4-byte copy each, 64 KiB a stage for a 128x128
float tile). The kernels instead evaluate such a term once per diagonal of the tile, on a
vector of the tile's differences, and spread it over the tile with a gather from registers.

A term qualifies when it sees q and kv only through q - kv and reads a table at a position or
divides positions (plain arithmetic of q - kv is cheaper per element than a gather): T5's
bucketed bias ``rel_bias[h, bucket[q - kv + kv_len]]`` as a whole, ``gain[q - kv + 64] *
score``'s table, or a dilated window's whole mask ``abs(q - kv) <= W and (q - kv) % D == 0``.
"""
from __future__ import annotations

import sympy

from .. import ir
from ..check import CheckedSpec
from .symbolic import Symbols, to_sympy

_POSITIONS = {"q", "kv"}


def diagonal_terms(spec: CheckedSpec, mask: bool = True) -> tuple[ir.Expr, ...]:
    """The largest terms of the score expression and (with ``mask``) the mask that depend on
    q and kv only through q - kv and cost more per element than a gather (a table read at a
    position, a division of positions), each once, in source order.

    >>> from flexdsl.check import check
    >>> [ir.unparse(t) for t in diagonal_terms(check("score + bias[h, q - kv + kv_len]"))]
    ['bias[h, q - kv + kv_len]']
    >>> dilated = check("where abs(q - kv) <= W and (q - kv) % D == 0")
    >>> [ir.unparse(t) for t in diagonal_terms(dilated)]
    ['abs(q - kv) <= W and (q - kv) % D == 0']
    >>> diagonal_terms(check("score + bias[h, q + kv]"))
    ()
    """
    symbols = Symbols(spec)
    found: dict[ir.Expr, None] = {}

    def visit(node: ir.Expr) -> None:
        if _costly(node) and through_difference(node, symbols):
            found.setdefault(node)
            return
        for child in ir.children(node):
            visit(child)

    visit(spec.spec.score)
    if mask and spec.spec.mask is not None:
        visit(spec.spec.mask)
    return tuple(found)


def through_difference(node: ir.Expr, symbols: Symbols) -> bool:
    """Whether ``node`` is one value per program and per q - kv: it names neither the score
    (one value per element) nor q or kv other than through their difference. For positions
    only, that is: q and kv are never negative (sympy reads abs(q) as q), so the kernels
    evaluate such a term at real positions of the tile."""
    used = ir.names(node)
    if ir.SCORE in used:
        return False
    if not used & _POSITIONS:
        return True
    if isinstance(node, ir.Lookup):
        return all(through_difference(i, symbols) for i in node.indices)
    if any(isinstance(n, ir.Lookup) for n in ir.walk(node)) or _logical(node):
        # A table's value is no algebra: its node must qualify on its own, and what combines
        # it with others may only combine values that qualify.
        return all(through_difference(c, symbols) for c in ir.children(node))
    if isinstance(node, ir.Compare):
        # A comparison of a and b sees what a - b sees.
        return all(_algebra_through_difference(ir.Binary("-", a, b), symbols)
                   for a, b in zip(node.operands, node.operands[1:]))
    return _algebra_through_difference(node, symbols)


def _logical(node: ir.Expr) -> bool:
    return (isinstance(node, ir.Binary) and node.op in ("and", "or")) or (
        isinstance(node, ir.Unary) and node.op == "not")


def _algebra_through_difference(node: ir.Expr, symbols: Symbols) -> bool:
    """For a node without lookups: with q = kv + d, does kv cancel out?"""
    q, kv = symbols["q"], symbols["kv"]
    difference = sympy.Symbol("difference", integer=True)
    try:
        moved = sympy.expand(to_sympy(node, symbols).subs(q, kv + difference))
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False
    return not moved.has(kv)


def _costly(node: ir.Expr) -> bool:
    """Whether ``node`` reads a table at a position or divides positions: more work per
    element than one gather (plain arithmetic of q - kv is less)."""
    for n in ir.walk(node):
        if isinstance(n, ir.Lookup) and ir.names(*n.indices) & _POSITIONS:
            return True
        if isinstance(n, ir.Binary) and n.op in ("//", "%") and ir.names(n) & _POSITIONS:
            return True
    return False


__all__ = ["diagonal_terms", "through_difference"]
