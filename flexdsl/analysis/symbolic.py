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
        # Derived run tensors (doc__lo_kv) are not in the signature; they hold positions.
        tensor = symbols.spec.signature.tensors.get(node.tensor)
        dtype = tensor.dtype if tensor is not None else "int"
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


def to_ir(expr, symbols: Symbols) -> ir.Expr:
    """sympy -> IR, so derived formulas print in the spec's language and reuse its evaluators.

    ``floor(n/d)`` and ``ceiling(n/d)`` with integer ``n`` and ``d`` become ``//``, so bounds
    stay exact integers; lookup symbols become the lookups they stand for.
    """
    names = {s: n for n, s in symbols.table.items()}
    for free in sympy.sympify(expr).free_symbols:  # symbols made by the caller keep their name
        names.setdefault(free, free.name)
    return _to_ir(sympy.sympify(expr), names, symbols.lookups)


def _to_ir(e, names, lookups) -> ir.Expr:
    if e in lookups:
        return lookups[e]
    if isinstance(e, sympy.Symbol):
        return ir.Name(names[e])
    if e is sympy.oo:
        return ir.Const("inf")
    if e is -sympy.oo:
        return ir.Unary("-", ir.Const("inf"))
    if e is sympy.pi:
        return ir.Const("pi")
    if e.is_Integer:
        value = int(e)
        return ir.Num(value) if value >= 0 else ir.Unary("-", ir.Num(-value))
    if e.is_Rational:
        return ir.Binary("/", _to_ir(sympy.Integer(e.p), names, lookups),
                         _to_ir(sympy.Integer(e.q), names, lookups))
    if e.is_Float:
        value = float(e)
        return ir.Num(value) if value >= 0 else ir.Unary("-", ir.Num(-value))
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=_term_order)
        out = _to_ir(terms[0], names, lookups)
        for term in terms[1:]:
            coefficient, rest = term.as_coeff_Mul()
            if coefficient.is_negative:
                out = ir.Binary("-", out, _to_ir(-term, names, lookups))
            else:
                out = ir.Binary("+", out, _to_ir(term, names, lookups))
        return out
    if isinstance(e, sympy.Mul):
        coefficient, rest = e.as_coeff_Mul()
        if coefficient.is_negative:
            return ir.Unary("-", _to_ir(-e, names, lookups))
        numerator, denominator = sympy.fraction(e)
        if denominator != 1:
            return ir.Binary("/", _to_ir(numerator, names, lookups),
                             _to_ir(denominator, names, lookups))
        factors = list(e.args)
        out = _to_ir(factors[0], names, lookups)
        for factor in factors[1:]:
            out = ir.Binary("*", out, _to_ir(factor, names, lookups))
        return out
    if isinstance(e, sympy.Pow):
        base, exponent = e.args
        if exponent == -1:
            return ir.Binary("/", ir.Num(1.0), _to_ir(base, names, lookups))
        if exponent == sympy.Rational(1, 2):
            return ir.Call("sqrt", (_to_ir(base, names, lookups),))
        if exponent == -sympy.Rational(1, 2):
            return ir.Call("rsqrt", (_to_ir(base, names, lookups),))
        if base == 2:
            return ir.Call("exp2", (_to_ir(exponent, names, lookups),))
        return ir.Binary("**", _to_ir(base, names, lookups), _to_ir(exponent, names, lookups))
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        numerator, denominator = sympy.fraction(sympy.together(e.args[0]))
        if denominator != 1 and numerator.is_integer and denominator.is_integer:
            if isinstance(e, sympy.floor):
                return ir.Binary("//", _to_ir(numerator, names, lookups),
                                 _to_ir(denominator, names, lookups))
            # ceil(n / d) == -((-n) // d)
            return ir.Unary("-", ir.Binary("//", _to_ir(sympy.expand(-numerator), names, lookups),
                                           _to_ir(denominator, names, lookups)))
        func = "floor" if isinstance(e, sympy.floor) else "ceil"
        return ir.Call(func, (_to_ir(e.args[0], names, lookups),))
    if isinstance(e, sympy.Mod):
        return ir.Binary("%", _to_ir(e.args[0], names, lookups), _to_ir(e.args[1], names, lookups))
    if isinstance(e, (sympy.Min, sympy.Max)):
        func = "min" if isinstance(e, sympy.Min) else "max"
        return ir.Call(func, tuple(_to_ir(a, names, lookups) for a in e.args))
    if isinstance(e, sympy.Abs):
        return ir.Call("abs", (_to_ir(e.args[0], names, lookups),))
    if isinstance(e, (sympy.Heaviside, sympy.sign)):
        # Derivatives of min, max, clamp and abs. At a tie, the value torch's autograd gives
        # (the reference's): min and max share the gradient, abs at 0 has none.
        x = _to_ir(e.args[0], names, lookups)
        zero = ir.Num(0) if e.args[0].is_integer else ir.Num(0.0)
        if isinstance(e, sympy.Heaviside):
            positive, negative = ir.Num(1.0), ir.Num(0.0)
            at_zero = sympy.Heaviside(0) if len(e.args) == 1 else e.args[1]
        else:
            positive, negative, at_zero = ir.Num(1.0), ir.Unary("-", ir.Num(1.0)), 0
        return ir.IfElse(positive, ir.Compare((x, zero), (">",)),
                         ir.IfElse(_to_ir(sympy.Float(at_zero), names, lookups),
                                   ir.Compare((x, zero), ("==",)), negative))
    simple = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh"}
    for kind, func in simple.items():
        if isinstance(e, kind):
            return ir.Call(func, (_to_ir(e.args[0], names, lookups),))
    if isinstance(e, sympy.Piecewise):
        (value, condition), *rest = e.args
        if not rest or condition is sympy.true:
            return _to_ir(value, names, lookups)
        return ir.IfElse(_to_ir(value, names, lookups), _to_ir(condition, names, lookups),
                         _to_ir(sympy.Piecewise(*rest), names, lookups))
    relations = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Lt: "<", sympy.Le: "<=",
                 sympy.Gt: ">", sympy.Ge: ">="}
    for kind, op in relations.items():
        if isinstance(e, kind):
            return ir.Compare((_to_ir(e.lhs, names, lookups), _to_ir(e.rhs, names, lookups)),
                              (op,))
    if isinstance(e, (sympy.And, sympy.Or)):
        op = "and" if isinstance(e, sympy.And) else "or"
        args = [_to_ir(a, names, lookups) for a in e.args]
        out = args[0]
        for a in args[1:]:
            out = ir.Binary(op, out, a)
        return out
    if isinstance(e, sympy.Not):
        return ir.Unary("not", _to_ir(e.args[0], names, lookups))
    if e is sympy.true or e is sympy.false:
        return ir.Compare((ir.Num(0), ir.Num(0)), ("==" if e is sympy.true else "!=",))
    raise NotImplementedError(f"no spec form for {e!r}")


def _term_order(term):
    """Positive terms first, so that ``q - kv`` prints as such rather than ``-kv + q``."""
    coefficient, _ = term.as_coeff_Mul()
    return (bool(coefficient.is_negative), bool(term.is_number), str(term))
