"""IR -> Triton expression text, over a [BLOCK_M, BLOCK_N] tile.

The kernel templates define a fixed set of names the text may use: ``q_idx`` ([BLOCK_M, 1] or
[BLOCK_M] int32), ``kv_idx`` ([1, BLOCK_N] or [BLOCK_N]), ``b``, ``h``, ``q_len``, ``kv_len``,
the score (``score``; or, where the lowering is given ``raw_score``, that raw dot product and
``sm_scale``), the parameters (``p_<name>``), and per tensor a pointer ``t_<name>``, its strides
``t_<name>_s<i>`` and sizes ``t_<name>_n<i>``. Python-semantics ``//`` and ``%`` (by a literal, by
a per-program value, by a per-element value) and the transcendental functions are helpers the
templates define (``_fdiv_prepared``, ``_fdiv_s``, ``_fdiv``, ``_tanh``...).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from .. import ir
from ..check import BOOL, FLOAT, INT, constant_value

_COMPARE = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_FLOAT_CALLS = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2",
                "sqrt": "tl.sqrt", "rsqrt": "tl.rsqrt", "tanh": "_tanh", "sigmoid": "_sigmoid"}


def param_name(name: str) -> str:
    return f"p_{name}"


def tensor_name(name: str) -> str:
    return f"t_{name}"


@dataclass(frozen=True)
class Divisor:
    """A divisor that is one value per program, prepared once (``_divisor``) outside the
    loop. ``per_head``: it names h, which the dk/dv pass changes from step to step."""
    name: str
    text: str
    per_head: bool

    @property
    def preparation(self) -> str:
        """The line that prepares it."""
        return f"{self.prepared} = _divisor({self.text})"

    @property
    def prepared(self) -> str:
        """The names of its prepared parts, as the ``_fdiv_prepared`` helpers take them."""
        return ", ".join(f"{self.name}_{part}" for part in ("b", "neg", "d", "bits", "magic"))


@dataclass
class Lowering:
    """Lowers expressions of one spec. ``types`` gives each node's type; ``valid`` maps a
    position name to the text of its in-range mask (lookups at padding rows must not load).
    With ``divisors``, divisors fixed per program are collected there, to be prepared before
    the loop, instead of at each use inside it."""
    type_of: object
    positions: dict[str, str]
    valid: dict[str, str] = field(default_factory=dict)
    tensors_used: set[str] = field(default_factory=set)
    divisors: dict[str, Divisor] | None = None
    # Division by a value fixed per program as a multiply by its reciprocal: for scores only,
    # and never where the quotient is compared or floored (41 * (1 / 41) < 1 in fp32).
    reciprocal: bool = False
    # Nodes already computed under a name (a table read along the tile's diagonals,
    # analysis/diagonal.py): the text is that name.
    computed: dict[ir.Expr, str] = field(default_factory=dict)
    # Float tables and parameters read as 0 where they are inf or nan (``_finite_or_zero``):
    # see render._split_bias.
    finite_inputs: bool = False
    # With a name for the tile's raw dot product (qk, unscaled), float arithmetic gathers the
    # values fixed per program (the scale, parameters, literals, log2(e)) into one factor
    # that the compiler computes once, out of the loop: see ``scaled``.
    raw_score: str | None = None
    _exact: int = field(default=0, init=False, repr=False)   # depth inside compares, floors

    def expr(self, node: ir.Expr) -> str:
        if self.computed and node in self.computed:
            return self.computed[node]
        return getattr(self, "_" + type(node).__name__)(node)

    def floating(self, node: ir.Expr) -> str:
        """The node's value as fp32 text."""
        if isinstance(node, ir.Num):
            return repr(float(node.value))
        if self.raw_score and not self._exact and self.type_of(node) == FLOAT:
            return self.scaled(node, ())
        text = self.expr(node)
        if self.type_of(node) == FLOAT:
            return text
        if not any(isinstance(n, (ir.Name, ir.Lookup)) for n in ir.walk(node)):
            # An integer constant (a derivative such as -1) is a Python int in the kernel.
            return f"({text} + 0.0)"
        return f"({text}).to(tl.float32)"

    def scaled(self, node: ir.Expr, factors: tuple[str, ...]) -> str:
        """fp32 text of ``node`` times the product of ``factors``, values fixed per program.

        The factors gather with the node's own per-program factors through products,
        quotients by a per-program value and negation, and meet the score as one multiplier
        of the raw dot product: ``cap * tanh(score / cap)`` in base 2 costs two multiplies an
        element, ``tanh(qk * c1) * c2``, instead of four. A sum takes them as one multiply
        of its whole value: ``(qk * sm_scale + b) * c`` is a fused multiply-add and a
        multiply, as the sum distributed would be, and the backward's ``s2 - lse2`` fuses
        with that multiply; distributed, infinite or huge terms could also differ (inf - inf).
        Each subexpression gets the same text wherever it occurs, so the compiler computes it
        once (the backward's derivative reuses the forward's tanh)."""
        if isinstance(node, ir.Name) and node.id == ir.SCORE and self.raw_score:
            return f"({self.raw_score} * {_product(('sm_scale', *factors))})"
        if self.type_of(node) == FLOAT and not isinstance(node, ir.Num) \
                and node not in self.computed:
            if isinstance(node, ir.Unary) and node.op == "-":
                return f"(-{self.scaled(node.operand, factors)})"
            if isinstance(node, ir.Binary) and node.op == "*":
                left, right = node.left, node.right
                if _uniform(left) and not _uniform(right):
                    left, right = right, left
                if _uniform(right):
                    return self.scaled(left, (*factors, self.floating(right)))
                if ir.SCORE not in ir.names(left):
                    left, right = right, left
                return f"({self.scaled(left, factors)} * {self.floating(right)})"
            if isinstance(node, ir.Binary) and node.op == "/" and _uniform(node.right) \
                    and self.reciprocal:
                return self.scaled(node.left, (*factors, f"(1.0 / {self.floating(node.right)})"))
        # Anything else (a sum, a call, a lookup, a term read along the diagonals) is one
        # value; its own operands gather their factors through floating().
        text = self.expr(node) if self.type_of(node) == FLOAT else self.floating(node)
        return f"({text} * {_product(factors)})" if factors else text

    def _as(self, node: ir.Expr, dtype: str) -> str:
        return self.floating(node) if dtype == FLOAT else self.expr(node)

    def _Num(self, node: ir.Num) -> str:
        return repr(node.value) if isinstance(node.value, int) else repr(float(node.value))

    def _Const(self, node: ir.Const) -> str:
        return "_INF" if node.name == "inf" else "3.141592653589793"

    def _Name(self, node: ir.Name) -> str:
        if node.id in self.positions:
            return self.positions[node.id]
        if node.id == ir.SCORE:
            return f"({self.raw_score} * sm_scale)" if self.raw_score else "score"
        if node.id in ir.LENGTHS:
            return node.id
        if self.finite_inputs and self.type_of(node) == FLOAT:
            return f"_finite_or_zero({param_name(node.id)})"
        return param_name(node.id)

    def _Lookup(self, node: ir.Lookup) -> str:
        self.tensors_used.add(node.tensor)
        t = tensor_name(node.tensor)
        offsets = []
        for i, index in enumerate(node.indices):
            # Clamped so a lookup can never leave its tensor; bind() checks ranges it can derive.
            idx = f"tl.minimum(tl.maximum({self.expr(index)}, 0), {t}_n{i} - 1)"
            offsets.append(f"({idx}).to(tl.int64) * {t}_s{i}")
        masks = sorted({self.valid[p] for index in node.indices for p in _positions(index)
                        if p in self.valid})
        mask = f", mask={' & '.join(masks)}, other=0" if masks else ""
        load = f"tl.load({t} + {' + '.join(offsets)}{mask})"
        if self.finite_inputs and self.type_of(node) == FLOAT:
            return f"_finite_or_zero({load})"
        return load

    def _divisor(self, node: ir.Expr, text: str) -> Divisor:
        if text not in self.divisors:
            self.divisors[text] = Divisor(f"div{len(self.divisors)}", text, "h" in ir.names(node))
        return self.divisors[text]

    def _Unary(self, node: ir.Unary) -> str:
        if node.op == "not":
            return f"(~({self.expr(node.operand)}))"
        return f"(-{self.expr(node.operand)})"

    def _Binary(self, node: ir.Binary) -> str:
        op = node.op
        folded = constant_value(node)
        if folded is not None and math.isfinite(folded):
            # Literals alone (`7 % -3`, `-7 // -2`): Python's value, as the reference has it.
            return repr(folded) if self.type_of(node) == INT or isinstance(folded, float) \
                else repr(float(folded))
        if op in ("and", "or"):
            return f"({self.expr(node.left)} {'&' if op == 'and' else '|'} {self.expr(node.right)})"
        if op == "/":
            if self.reciprocal and not self._exact and _uniform(node.right):
                # One reciprocal for the program, then a multiply per element: a division
                # per element is a reciprocal on the unit that also computes exp2 and tanh.
                return f"({self.floating(node.left)} * (1.0 / {self.floating(node.right)}))"
            return f"({self.floating(node.left)} / {self.floating(node.right)})"
        if op in ("//", "%"):
            helper = "_fdiv" if op == "//" else "_fmod"
            left, right = self.expr(node.left), self.expr(node.right)
            if isinstance(node.left, ir.Num):  # the helper converts its operands: give it tensors
                left = f"({left} + 0 * {right})"
            if _uniform(node.right) and not isinstance(node.right, ir.Num):
                # A literal stays with the plain helper: the compiler divides by a constant.
                if self.divisors is None:
                    return f"{helper}_s({left}, {right})"
                return f"{helper}_prepared({left}, {self._divisor(node.right, right).prepared})"
            return f"{helper}({left}, {right})"
        if op == "**":
            exponent = constant_value(node.right)
            if isinstance(exponent, int) and -_POWER_BY_PRODUCTS <= exponent <= _POWER_BY_PRODUCTS:
                # An integer power by products: exact, and right for negative bases, where
                # exp2(y * log2(x)) is NaN.
                if exponent == 0:
                    base = self.expr(node.left)
                    # Shaped like the base (a bare 1 has no .to()); 1 even where it is inf.
                    return (f"(0 * {base} + 1)" if self.type_of(node) == INT
                            else f"tl.where({base} == {base}, 1.0, 1.0)")
                literal = constant_value(node.left) is not None
                if exponent > 0:
                    return _power(self.expr(node.left), exponent, literal)
                return f"(1.0 / {_power(self.floating(node.left), -exponent, literal)})"
            return f"_pow({self.floating(node.left)}, {self.floating(node.right)})"
        dtype = self.type_of(node)
        return f"({self._as(node.left, dtype)} {op} {self._as(node.right, dtype)})"

    def _Compare(self, node: ir.Compare) -> str:
        with self._exactly():
            return self._compare(node)

    def _compare(self, node: ir.Compare) -> str:
        kinds = [self.type_of(o) for o in node.operands]
        dtype = FLOAT if FLOAT in kinds else INT
        values = [self._as(o, dtype) for o in node.operands]
        parts = [f"({a} {_COMPARE[op]} {b})" for op, a, b in zip(node.ops, values, values[1:])]
        if dtype == FLOAT and _uniform(node):
            # One value a program (gate[h] > 0.3): triton's interpreter keeps such a float
            # comparison as floats, which '&' then refuses; '!= 0' makes it a condition.
            parts = [f"({p} != 0)" for p in parts]
        return parts[0] if len(parts) == 1 else "(" + " & ".join(parts) + ")"

    def _Call(self, node: ir.Call) -> str:
        f = node.func
        if f in _FLOAT_CALLS:
            return f"{_FLOAT_CALLS[f]}({self.floating(node.args[0])})"
        if f in ("floor", "ceil"):
            with self._exactly():
                return self._rounding(node)
        dtype = self.type_of(node)
        args = [self._as(a, dtype) for a in node.args]
        if f == "abs":
            return f"tl.abs({args[0]})"
        if f == "clamp":
            return f"tl.minimum(tl.maximum({args[0]}, {args[1]}), {args[2]})"
        combine = "tl.minimum" if f == "min" else "tl.maximum"
        out = args[0]
        for a in args[1:]:
            out = f"{combine}({out}, {a})"
        return out

    def _rounding(self, node: ir.Call) -> str:
        f = node.func
        if self.type_of(node.args[0]) != FLOAT:
            return self.expr(node.args[0])
        argument = node.args[0]
        if isinstance(argument, ir.Call) and argument.func == "log2":
            # Log buckets: exact, where the GPU's log2 is not (_exact_floor_log2).
            return f"_{f}_log2({self.floating(argument.args[0])}).to(tl.int32)"
        return f"tl.{f}({self.expr(argument)}).to(tl.int32)"

    @contextlib.contextmanager
    def _exactly(self):
        self._exact += 1
        try:
            yield
        finally:
            self._exact -= 1

    def _IfElse(self, node: ir.IfElse) -> str:
        dtype = self.type_of(node)
        if dtype == BOOL:
            return f"tl.where({self.expr(node.test)}, {self.expr(node.then)}, " \
                   f"{self.expr(node.orelse)})"
        return (f"tl.where({self.expr(node.test)}, {self._as(node.then, dtype)}, "
                f"{self._as(node.orelse, dtype)})")


def _product(factors: tuple[str, ...]) -> str:
    return factors[0] if len(factors) == 1 else "(" + " * ".join(factors) + ")"


def _uniform(node: ir.Expr) -> bool:
    """Whether ``node`` is one value for a whole program: free of positions within the tile
    and of the score (b and h are fixed per program; lookups of them are single loads)."""
    return not ir.names(node) & {"q", "kv", ir.SCORE}


def _positions(node: ir.Expr) -> set[str]:
    return ir.names(node) & set(ir.POSITIONS)


# Integer powers up to this are products (x ** 12: four multiplies by squaring); beyond, _pow.
_POWER_BY_PRODUCTS = 64


def _power(base: str, exponent: int, literal: bool) -> str:
    """``base ** exponent`` (a positive int) as products by squaring: in the template's
    ``_ipow``, the base's text once, so that nested powers do not multiply it; written out
    for a base of literals (a Python number, which ``_ipow`` cannot take)."""
    if exponent == 1:
        return base
    if not literal:
        return f"_ipow({base}, {exponent})"
    half = _power(base, exponent // 2, literal)
    square = f"({half} * {half})"
    return f"({square} * {base})" if exponent % 2 else square
