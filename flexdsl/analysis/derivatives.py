"""Derivatives of the score expression, for the backward kernels.

``d score_expr / d score`` turns dP into dS; ``d score_expr / d T[i...]`` for each float
tensor lookup in the score gives that tensor's gradient, accumulated at index ``i...``.
Both come back as IR so the lowering treats them like any other expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from ..check import FLOAT, CheckedSpec
from .diagonal import through_difference
from .symbolic import Symbols, to_ir, to_sympy


@dataclass(frozen=True)
class TensorGradient:
    """``tensor`` receives ``derivative`` * dS at the indices of ``lookup``. ``relative``:
    the indices see q and kv only through q - kv (a relative-position table), so a tile's
    gradient can be summed along its diagonals before it is accumulated."""
    tensor: str
    lookup: ir.Lookup
    derivative: ir.Expr
    relative: bool = False


@dataclass(frozen=True)
class ScoreDerivatives:
    d_score: ir.Expr
    tensors: tuple[TensorGradient, ...]

    @property
    def identity(self) -> bool:
        """True when dS == dP: the score expression is score plus terms free of it."""
        return self.d_score in (ir.Num(1), ir.Num(1.0))


def score_derivatives(spec: CheckedSpec) -> ScoreDerivatives:
    """The derivatives of the score expression of ``spec``.

    >>> from flexdsl.check import check
    >>> ir.unparse(score_derivatives(check("cap * tanh(score / cap)")).d_score)
    '1 - tanh(score / cap) ** 2'
    """
    symbols = Symbols(spec)
    expression = to_sympy(spec.spec.score, symbols)
    d_score = _tidy(sympy.diff(expression, symbols[ir.SCORE]))
    gradients = []
    for symbol, lookup in list(symbols.lookups.items()):
        if spec.signature.tensors[lookup.tensor].dtype != FLOAT:
            continue
        derivative = _tidy(sympy.diff(expression, symbol))
        if derivative == 0:
            continue
        gradients.append(TensorGradient(lookup.tensor, lookup, to_ir(derivative, symbols),
                                        _through_difference(lookup, symbols)))
    return ScoreDerivatives(to_ir(d_score, symbols), tuple(gradients))


def _through_difference(lookup: ir.Lookup, symbols: Symbols) -> bool:
    """Whether every index of ``lookup`` depends on q and kv, if at all, only through q - kv."""
    positions = {"q", "kv"}
    uses = ir.names(*lookup.indices)
    if not positions <= uses:
        return False
    if any(isinstance(n, ir.Lookup) for i in lookup.indices for n in ir.walk(i)):
        return False
    return all(through_difference(i, symbols) for i in lookup.indices)


def _tidy(expression):
    # floor and ceil are steps: 0 almost everywhere, as torch's autograd has them; sympy
    # leaves their derivative unevaluated.
    expression = expression.replace(
        lambda e: isinstance(e, sympy.Derivative) and isinstance(e.expr, (sympy.floor,
                                                                          sympy.ceiling)),
        lambda e: sympy.Integer(0)).doit()   # doit: a chain rule's Subs(0, ...) is 0
    expression = sympy.piecewise_fold(expression)
    if isinstance(expression, sympy.Piecewise):
        return expression
    return sympy.expand(expression) if expression.is_polynomial() else expression
