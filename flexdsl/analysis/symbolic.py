"""IR -> sympy. Positions, lengths and parameters become symbols with the right assumptions.

Lookups have no closed form; they become opaque symbols (``doc[q]`` -> ``doc__q``) recorded in
``Symbols.lookups`` so later stages can treat them as data, never as algebra.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from .. import ir
from ..check import FLOAT, CheckedSpec

# The extents of b and h are not names of the language; these symbols stand for them.
N_BATCH, N_HEADS = "n_batch", "n_heads"


@dataclass
class Symbols:
    spec: CheckedSpec
    table: dict[str, sympy.Symbol] = field(default_factory=dict)
    lookups: dict[sympy.Symbol, ir.Lookup] = field(default_factory=dict)

    def __post_init__(self):
        for name in (*ir.POSITIONS,):
            self.table[name] = sympy.Symbol(name, integer=True, nonnegative=True)
        for name in (*ir.LENGTHS, N_BATCH, N_HEADS):
            self.table[name] = sympy.Symbol(name, integer=True, positive=True)
        for p in self.spec.signature.params.values():
            self.table[p.name] = (sympy.Symbol(p.name, real=True) if p.dtype == FLOAT
                                  else sympy.Symbol(p.name, integer=True))
        self.table[ir.SCORE] = sympy.Symbol(ir.SCORE, real=True)

    def __getitem__(self, name: str) -> sympy.Symbol:
        return self.table[name]


_FUNCTIONS = {
    "abs": sympy.Abs, "exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt,
    "tanh": sympy.tanh, "floor": sympy.floor, "ceil": sympy.ceiling,
    "exp2": lambda x: 2 ** x, "log2": lambda x: sympy.log(x, 2),
    "rsqrt": lambda x: 1 / sympy.sqrt(x), "sigmoid": lambda x: 1 / (1 + sympy.exp(-x)),
    "min": sympy.Min, "max": sympy.Max,
    "clamp": lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi),
}
_RELATIONS = {"==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le,
              ">": sympy.Gt, ">=": sympy.Ge}


def to_sympy(node: ir.Expr, symbols: Symbols):
    """A sympy expression (or boolean) equal to ``node``; lookups become opaque symbols."""
    if isinstance(node, ir.Num):
        return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Float(
            node.value)
    if isinstance(node, ir.Const):
        return sympy.oo if node.name == "inf" else sympy.pi
    if isinstance(node, ir.Name):
        return symbols[node.id]
    if isinstance(node, ir.Lookup):
        key = "__".join([node.tensor, *(_slug(ir.unparse(i)) for i in node.indices)])
        dtype = symbols.spec.signature.tensors[node.tensor].dtype
        symbol = (sympy.Symbol(key, real=True) if dtype == FLOAT
                  else sympy.Symbol(key, integer=True))
        symbols.lookups[symbol] = node
        return symbol
    if isinstance(node, ir.Unary):
        operand = to_sympy(node.operand, symbols)
        return sympy.Not(operand) if node.op == "not" else -operand
    if isinstance(node, ir.Binary):
        left, right = to_sympy(node.left, symbols), to_sympy(node.right, symbols)
        return {
            "and": lambda: sympy.And(left, right), "or": lambda: sympy.Or(left, right),
            "+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
            "/": lambda: left / right, "//": lambda: sympy.floor(left / right),
            "%": lambda: sympy.Mod(left, right), "**": lambda: left ** right,
        }[node.op]()
    if isinstance(node, ir.Compare):
        values = [to_sympy(o, symbols) for o in node.operands]
        parts = [_RELATIONS[op](a, b) for op, a, b in zip(node.ops, values, values[1:])]
        return sympy.And(*parts) if len(parts) > 1 else parts[0]
    if isinstance(node, ir.Call):
        return _FUNCTIONS[node.func](*(to_sympy(a, symbols) for a in node.args))
    if isinstance(node, ir.IfElse):
        return sympy.Piecewise((to_sympy(node.then, symbols), to_sympy(node.test, symbols)),
                               (to_sympy(node.orelse, symbols), True))
    raise TypeError(node)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
