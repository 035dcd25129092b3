"""Names, types, arities and tensor ranks: a parsed Spec -> a CheckedSpec and its Signature.

Types are int, float and bool. Parameters and tensor elements get their type from how they are
used: as an index, or under ``//`` and ``%``, they are int; combined with a float (``score``, a
float literal, ``exp(...)``) they are float; a parameter only ever compared with positions (``W``
in ``q - kv < W``) is int. Using one both ways is an error at the second use. A name with no
such evidence but a float-looking use (``score / T``, ``exp(T)``, ``slope[h] > 0.5``) leans to
float: that settles it only if nothing else does, so it never makes a spec an error.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Union

from . import ir
from .errors import SpecTypeError
from .grammar import parse

INT, FLOAT, BOOL = "int", "float", "bool"
# Keywords of a compiled spec's call, beside which its parameters and tensors are passed.
CALL_KEYWORDS = {"scale": "softmax scale", "return_lse": "switch for the log-sum-exp"}


@dataclass(frozen=True)
class Function:
    """A function of the language: how many arguments and what it returns."""
    min_args: int
    max_args: int | None
    result: str  # FLOAT, INT, or "same": the common type of its arguments
    doc: str


# One table, easy to extend; lowering and the reference each map these names to their forms.
FUNCTIONS: dict[str, Function] = {
    "abs": Function(1, 1, "same", "absolute value"),
    "min": Function(2, None, "same", "smallest argument"),
    "max": Function(2, None, "same", "largest argument"),
    "clamp": Function(3, 3, "same", "clamp(x, lo, hi) = min(max(x, lo), hi)"),
    "exp": Function(1, 1, FLOAT, "e ** x"),
    "exp2": Function(1, 1, FLOAT, "2 ** x"),
    "log": Function(1, 1, FLOAT, "natural logarithm"),
    "log2": Function(1, 1, FLOAT, "base-2 logarithm"),
    "sqrt": Function(1, 1, FLOAT, "square root"),
    "rsqrt": Function(1, 1, FLOAT, "1 / sqrt(x)"),
    "tanh": Function(1, 1, FLOAT, "hyperbolic tangent"),
    "sigmoid": Function(1, 1, FLOAT, "1 / (1 + exp(-x))"),
    "floor": Function(1, 1, INT, "largest integer <= x"),
    "ceil": Function(1, 1, INT, "smallest integer >= x"),
}


@dataclass(frozen=True)
class Param:
    """A scalar bound when compiling or calling: ``W``, ``cap``."""
    name: str
    dtype: str
    span: ir.Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TensorUse:
    """One lookup of a tensor: its index expressions and where it stands."""
    indices: tuple[ir.Expr, ...]
    span: ir.Span | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return ", ".join(ir.unparse(i) for i in self.indices)


@dataclass(frozen=True)
class TensorParam:
    """A tensor passed at call time: its rank, element type and every use."""
    name: str
    rank: int
    dtype: str
    uses: tuple[TensorUse, ...]


@dataclass(frozen=True)
class Signature:
    params: dict[str, Param]
    tensors: dict[str, TensorParam]

    def describe(self) -> list[str]:
        """Human-readable lines, one per parameter and tensor."""
        lines = []
        for p in self.params.values():
            lines.append(f"parameter {p.name}: {p.dtype}")
        for t in self.tensors.values():
            uses = " and by ".join(f"[{u}]" for u in _unique(t.uses))
            lines.append(f"tensor    {t.name}: {t.dtype}, rank {t.rank}, indexed by {uses}")
        return lines


def _unique(uses):
    seen, out = set(), []
    for u in uses:
        if str(u) not in seen:
            seen.add(str(u))
            out.append(u)
    return out


@dataclass(frozen=True)
class CheckedSpec:
    """A spec known to mean something, with the types of its free names."""
    spec: ir.Spec
    signature: Signature

    @property
    def text(self) -> str:
        return self.spec.text or ir.unparse(self.spec)

    def __str__(self) -> str:
        return ir.unparse(self.spec)

    def type_of(self, node: ir.Expr) -> str:
        """The type of any sub-expression, now that every free name has one."""
        return Typer(self.signature).type_of(node)


_CONSTANT_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                 "/": lambda a, b: a / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b}


def constant_value(node: ir.Expr) -> int | float | None:
    """The value of an expression of literals alone (``3 - 3``, ``-(2 * 0.5)``), else None.

    >>> constant_value(parse("score / (3 - 3)").score.right), constant_value(parse("q").score)
    (0, None)
    """
    if isinstance(node, ir.Num):
        return node.value
    if isinstance(node, ir.Unary) and node.op == "-":
        inner = constant_value(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ir.Binary) and node.op in _CONSTANT_OPS:
        left, right = constant_value(node.left), constant_value(node.right)
        if left is None or right is None:
            return None
        try:
            return _CONSTANT_OPS[node.op](left, right)
        except ArithmeticError:   # 1 // 0 inside: reported where it stands
            return None
    if isinstance(node, ir.Call) and node.func in ("abs", "min", "max"):
        args = [constant_value(a) for a in node.args]
        if any(a is None for a in args):
            return None
        return {"abs": abs, "min": min, "max": max}[node.func](*args)
    return None


def check(spec: Union[str, ir.Spec]) -> CheckedSpec:
    """Check a spec (text or parsed) and return it with its signature.

    >>> check("score + slope[h] * (kv - q) where q >= kv").signature.tensors["slope"].dtype
    'float'
    """
    if isinstance(spec, str):
        spec = parse(spec)
    text = spec.text or ir.unparse(spec)
    try:
        return _Checker(spec).run()
    except SpecTypeError as error:
        raise error.with_spec(text) from None


# ----------------------------------------------------------------------------------------------

class _Var:
    """The unknown numeric type of a parameter or a tensor's elements (union-find)."""

    def __init__(self, name: str):
        self.name = name
        self.parent: _Var = self
        self.dtype: str | None = None
        self.why: ir.Span | None = None
        self.leans_float = False  # a soft preference, used only if nothing forces a type

    def root(self) -> "_Var":
        node = self
        while node.parent is not node:
            node = node.parent
        return node


# An expression's type while checking: a concrete type, or numeric tied to unknown names.
_Type = Union[str, frozenset]


class _Checker:
    def __init__(self, spec: ir.Spec):
        self.spec = spec
        self.vars: dict[str, _Var] = {}
        self.kinds: dict[str, str] = {}   # name -> "param" or "tensor"
        self.first_span: dict[str, ir.Span | None] = {}
        self.ranks: dict[str, tuple[int, ir.Span | None]] = {}
        self.uses: dict[str, list[TensorUse]] = {}
        self.in_mask = False

    def run(self) -> CheckedSpec:
        score_type = self.visit(self.spec.score)
        if score_type == BOOL:
            raise SpecTypeError(
                "the score expression is a condition, not a number", span=self.spec.score.span,
                hint=f"to mask, write 'where {ir.unparse(self.spec.score)}'")
        self.force(self.resolved(score_type), FLOAT, self.spec.score.span, "the score")
        if self.spec.mask is not None:
            self.in_mask = True
            mask_type = self.visit(self.spec.mask)
            if mask_type != BOOL:
                raise SpecTypeError(
                    "the mask is a number, not a condition", span=self.spec.mask.span,
                    hint="a mask decides which positions are kept, e.g. 'where q >= kv'")
        return CheckedSpec(self.spec, self.signature())

    def signature(self) -> Signature:
        params, tensors = {}, {}
        for name, kind in self.kinds.items():
            root = self.var(name).root()
            dtype = root.dtype or (FLOAT if root.leans_float else INT)
            if kind == "param":
                params[name] = Param(name, dtype, self.first_span[name])
            else:
                tensors[name] = TensorParam(name, self.ranks[name][0], dtype,
                                            tuple(self.uses[name]))
        return Signature(params, tensors)

    # -- unknown numeric types ------------------------------------------------------------

    def var(self, name: str) -> _Var:
        if name not in self.vars:
            self.vars[name] = _Var(name)
        return self.vars[name]

    def force(self, t: _Type, dtype: str, span, reason: str) -> None:
        """Make every unknown tied to ``t`` take ``dtype``; clash if one already has the other."""
        if not isinstance(t, frozenset):
            return
        for name in t:
            root = self.var(name).root()
            if root.dtype is None:
                root.dtype, root.why = dtype, span
            elif root.dtype != dtype:
                raise SpecTypeError(
                    f"'{name}' is used as {root.dtype} elsewhere, but {reason} here needs "
                    f"{'an' if dtype == INT else 'a'} {dtype}", span=span,
                    hint=f"a {self.kinds.get(name, 'name')} has one type throughout the spec")

    def resolved(self, t: _Type) -> _Type:
        """``t`` with unknowns that already have a type replaced by it."""
        if not isinstance(t, frozenset):
            return t
        dtypes = {self.var(n).root().dtype for n in t}
        if FLOAT in dtypes:
            return FLOAT
        unknown = frozenset(n for n in t if self.var(n).root().dtype is None)
        return unknown if unknown else INT

    def unify(self, types, span) -> _Type:
        """The type of an arithmetic combination of ``types`` (all numeric)."""
        types = [self.resolved(t) for t in types]
        if FLOAT in types:
            for t in types:
                self.force(t, FLOAT, span, "mixing with a float")
            return FLOAT
        unknown = frozenset().union(*[t for t in types if isinstance(t, frozenset)])
        if not unknown:
            return INT
        roots = [self.var(n).root() for n in unknown]
        for other in roots[1:]:
            if other is not roots[0]:
                other.parent = roots[0]
                roots[0].leans_float |= other.leans_float
        return unknown

    def lean_float(self, types) -> None:
        """Unknowns used the way floats are (``/``, ``exp``, compared with a float) lean float."""
        for t in types:
            t = self.resolved(t)
            if isinstance(t, frozenset):
                for name in t:
                    self.var(name).root().leans_float = True

    def require_number(self, t: _Type, node: ir.Expr, what: str) -> None:
        if t == BOOL:
            raise SpecTypeError(
                f"a condition is used as a number {what}", span=node.span,
                hint="turn a condition into a number with 'a if condition else b'")

    def require_int(self, t: _Type, node: ir.Expr, what: str) -> None:
        self.require_number(t, node, what)
        t = self.resolved(t)
        if t == FLOAT:
            hint = ("use '//' for integer division, or floor(...) / ceil(...)" if what == "as an index"
                    else "'//' and '%' take integers; use '/' for a float quotient")
            raise SpecTypeError(f"a float is used {what}", span=node.span, hint=hint)
        self.force(t, INT, node.span, what)

    # -- the walk -------------------------------------------------------------------------

    def visit(self, node: ir.Expr) -> _Type:
        method = getattr(self, "visit_" + type(node).__name__)
        return method(node)

    def visit_Num(self, node: ir.Num) -> _Type:
        return INT if isinstance(node.value, int) else FLOAT

    def visit_Const(self, node: ir.Const) -> _Type:
        return FLOAT

    def visit_Name(self, node: ir.Name) -> _Type:
        name = node.id
        if name == ir.SCORE:
            if self.in_mask:
                raise SpecTypeError(
                    "'score' cannot be used in the mask", span=node.span,
                    hint="the mask decides which positions exist before any score does; "
                         "change the score before 'where' instead, e.g. "
                         "'score if cond else -inf'")
            return FLOAT
        if name in ir.POSITIONS or name in ir.LENGTHS:
            return INT
        self.judge_free_name(node, name)
        if self.kinds.setdefault(name, "param") == "tensor":
            raise SpecTypeError(f"'{name}' is a tensor and needs an index", span=node.span,
                                hint=f"write {name}[...] as elsewhere in the spec")
        self.first_span.setdefault(name, node.span)
        return frozenset([name])

    def judge_free_name(self, node, name: str) -> None:
        """Single lowercase letters are reserved for positions; near misses are typos; a
        function's name or Python's True and False are not parameters either."""
        self.judge_call_argument(name, node.span)
        if name in FUNCTIONS:
            raise SpecTypeError(f"'{name}' is a function, not a value", span=node.span,
                                hint=f"call it: {name}(...) ({FUNCTIONS[name].doc})")
        if name in ("True", "False", "true", "false", "None"):
            raise SpecTypeError(f"'{name}' is not a value of the language", span=node.span,
                                hint="conditions are true or false already: write "
                                     "'q >= kv', not 'q >= kv == True'; 'not c' negates")
        if len(name) == 1 and name.islower() and name not in ir.POSITIONS:
            near = {"k": "kv", "v": "kv", "i": "q", "j": "kv", "n": "kv", "m": "q",
                    "s": "score", "x": "h"}.get(name)
            hint = "positions are b (batch), h (head), q (query) and kv (key)"
            if near:
                hint += f" (did you mean '{near}'?)"
            hint += "; parameters are named with a capital or several letters (W, cap)"
            raise SpecTypeError(f"unknown name '{name}'", span=node.span, hint=hint)
        if _is_near_miss(name):
            near = _nearest(name, [ir.SCORE, "kv", *ir.LENGTHS])
            raise SpecTypeError(f"unknown name '{name}'", span=node.span,
                                hint=f"did you mean '{near}'? (a parameter must not look so "
                                     f"much like a built-in name)")

    @staticmethod
    def judge_call_argument(name: str, span) -> None:
        """Parameters and tensors are passed by name to a call, beside its own keywords."""
        if name in CALL_KEYWORDS:
            raise SpecTypeError(f"'{name}' is an argument of every call (the "
                                f"{CALL_KEYWORDS[name]}), so it cannot name a "
                                "parameter or tensor of the spec", span=span,
                                hint="give it another name (the call's own keywords are "
                                     + " and ".join(CALL_KEYWORDS) + ")")

    def visit_Lookup(self, node: ir.Lookup) -> _Type:
        name = node.tensor
        self.judge_call_argument(name, node.name_span)
        if name in ir.RESERVED:
            raise SpecTypeError(f"'{name}' is not a tensor and cannot be indexed",
                                span=node.name_span,
                                hint="tensors are names of your own, passed at call time")
        if len(name) == 1 and name.islower():
            raise SpecTypeError(f"'{name}' cannot name a tensor", span=node.name_span,
                                hint="single lowercase letters are kept for positions; "
                                     "name tensors with more letters (doc, slope, bias)")
        if self.kinds.setdefault(name, "tensor") == "param":
            raise SpecTypeError(f"'{name}' is a parameter elsewhere but indexed here",
                                span=node.name_span, hint="a name is a tensor or a scalar "
                                                          "parameter, not both")
        rank = len(node.indices)
        if name in self.ranks and self.ranks[name][0] != rank:
            before = self.ranks[name][0]
            raise SpecTypeError(
                f"'{name}' is indexed with {rank} index{'es' if rank > 1 else ''} here "
                f"but {before} elsewhere", span=node.span,
                hint="a tensor has one rank throughout the spec")
        self.ranks.setdefault(name, (rank, node.span))
        self.uses.setdefault(name, []).append(TensorUse(node.indices, node.span))
        for index in node.indices:
            score = _score_in(index)
            if score is not None:  # in the score expression too: a score is not a position
                raise SpecTypeError("'score' cannot be used in an index", span=score.span,
                                    hint="indices are int expressions of positions, lengths, "
                                         "parameters and int lookups")
            self.require_int(self.visit(index), index, "as an index")
        self.var(name)
        return frozenset([name])

    def visit_Unary(self, node: ir.Unary) -> _Type:
        t = self.visit(node.operand)
        if node.op == "not":
            if t != BOOL:
                raise SpecTypeError("'not' needs a condition", span=node.operand.span,
                                    hint="compare first, e.g. 'not q >= kv'")
            return BOOL
        self.require_number(t, node.operand, "with unary '-'")
        return t

    def visit_Binary(self, node: ir.Binary) -> _Type:
        left, right = self.visit(node.left), self.visit(node.right)
        if node.op in ("and", "or"):
            for t, operand in ((left, node.left), (right, node.right)):
                if t != BOOL:
                    raise SpecTypeError(
                        f"'{node.op}' needs conditions on both sides, this is a number",
                        span=operand.span, hint="compare it, e.g. 'doc[q] == doc[kv]'")
            return BOOL
        for t, operand in ((left, node.left), (right, node.right)):
            self.require_number(t, operand, f"with '{node.op}'")
        if node.op in ("/", "//", "%") and constant_value(node.right) == 0:
            raise SpecTypeError(f"division by zero: the right side of '{node.op}' is 0",
                                span=node.right.span,
                                hint="divide by a non-zero number or a parameter")
        if node.op == "**" and constant_value(node.left) == 0 and (
                (constant_value(node.right) or 0) < 0):
            raise SpecTypeError("0 to a negative power divides by zero", span=node.span,
                                hint="a negative power is 1 / a power: raise a non-zero base")
        if node.op in ("//", "%"):
            for t, operand in ((left, node.left), (right, node.right)):
                self.require_int(t, operand, f"with '{node.op}'")
            return self.unify([left, right], node.span)
        if node.op == "/":
            self.lean_float([self.unify([left, right], node.span)])
            return FLOAT
        if node.op == "**":
            if (isinstance(node.right, ir.Num) and isinstance(node.right.value, int)
                    and self.resolved(left) != FLOAT):
                return self.unify([left], node.span)
            self.lean_float([left, right])
            return FLOAT
        return self.unify([left, right], node.span)

    def visit_Compare(self, node: ir.Compare) -> _Type:
        types = [self.visit(o) for o in node.operands]
        for t, operand in zip(types, node.operands):
            self.require_number(t, operand, "in a comparison")
        # Lookups compared with each other share an element type (doc[q] == doc[kv]).
        unknown = [t for t in types if isinstance(self.resolved(t), frozenset)]
        if len(unknown) > 1:
            self.unify(unknown, node.span)
        if any(self.resolved(t) == FLOAT for t in types):
            self.lean_float(unknown)
        return BOOL

    def visit_Call(self, node: ir.Call) -> _Type:
        function = FUNCTIONS.get(node.func)
        if function is None:
            hint = "functions are " + ", ".join(FUNCTIONS)
            close = difflib.get_close_matches(node.func, list(FUNCTIONS), n=1, cutoff=0.6)
            if close:
                hint = f"did you mean '{close[0]}'? " + hint
            if node.func in self.kinds and self.kinds[node.func] == "tensor":
                hint = f"tensors are indexed with brackets: {node.func}[...]"
            raise SpecTypeError(f"unknown function '{node.func}'", span=node.name_span,
                                hint=hint)
        n = len(node.args)
        if n < function.min_args or (function.max_args is not None and n > function.max_args):
            if function.max_args is None:
                wanted = f"at least {function.min_args} arguments"
            else:
                wanted = (f"{function.min_args} argument"
                          f"{'s' if function.min_args > 1 else ''}")
            raise SpecTypeError(f"{node.func}() takes {wanted}, got {n}", span=node.span,
                                hint=f"{node.func}: {function.doc}")
        types = [self.visit(a) for a in node.args]
        for t, arg in zip(types, node.args):
            self.require_number(t, arg, f"as an argument of {node.func}()")
        if function.result == "same":
            return self.unify(types, node.span)
        self.lean_float(types)  # exp(T), floor(T): T is most likely a float
        return function.result

    def visit_IfElse(self, node: ir.IfElse) -> _Type:
        test = self.visit(node.test)
        if test != BOOL:
            raise SpecTypeError("the condition of 'if' is a number", span=node.test.span,
                                hint="compare it, e.g. 'score if q >= kv else -inf'")
        then, orelse = self.visit(node.then), self.visit(node.orelse)
        if (then == BOOL) != (orelse == BOOL):
            culprit = node.orelse if then == BOOL else node.then
            raise SpecTypeError("one branch is a condition and the other a number",
                                span=culprit.span, hint="both branches must be of one kind")
        if then == BOOL:
            return BOOL
        return self.unify([then, orelse], node.span)


def _nearest(name: str, known: list[str]) -> str:
    return max(known, key=lambda k: difflib.SequenceMatcher(None, name.lower(), k).ratio())


def _is_near_miss(name: str) -> bool:
    """A name one slip away from a built-in one (``kb``, ``qlen``, ``Score``): a typo."""
    lowered = name.lower()
    if lowered in (ir.SCORE, "kv", *ir.LENGTHS):
        return name not in (ir.SCORE, "kv", *ir.LENGTHS)
    if len(name) == 2:
        return sum(a != b for a, b in zip(lowered, "kv")) == 1 and name.islower()
    return bool(difflib.get_close_matches(lowered, [ir.SCORE, *ir.LENGTHS], n=1, cutoff=0.8))


def _score_in(node: ir.Expr) -> ir.Name | None:
    return next((n for n in ir.walk(node) if isinstance(n, ir.Name) and n.id == ir.SCORE), None)


class Typer:
    """Types of sub-expressions once the signature has settled every free name."""

    def __init__(self, signature: Signature):
        self.signature = signature

    def type_of(self, node: ir.Expr) -> str:
        if isinstance(node, ir.Num):
            return INT if isinstance(node.value, int) else FLOAT
        if isinstance(node, ir.Const):
            return FLOAT
        if isinstance(node, ir.Name):
            if node.id == ir.SCORE:
                return FLOAT
            if node.id in self.signature.params:
                return self.signature.params[node.id].dtype
            return INT
        if isinstance(node, ir.Lookup):
            return self.signature.tensors[node.tensor].dtype
        if isinstance(node, (ir.Compare,)):
            return BOOL
        if isinstance(node, ir.Unary):
            return BOOL if node.op == "not" else self.type_of(node.operand)
        if isinstance(node, ir.Binary):
            if node.op in ("and", "or"):
                return BOOL
            if node.op == "/":
                return FLOAT
            left, right = self.type_of(node.left), self.type_of(node.right)
            if node.op == "**":
                exact = isinstance(node.right, ir.Num) and isinstance(node.right.value, int)
                return INT if exact and left == INT else FLOAT
            return FLOAT if FLOAT in (left, right) else INT
        if isinstance(node, ir.Call):
            result = FUNCTIONS[node.func].result
            if result != "same":
                return result
            return FLOAT if FLOAT in map(self.type_of, node.args) else INT
        if isinstance(node, ir.IfElse):
            then, orelse = self.type_of(node.then), self.type_of(node.orelse)
            if then == BOOL:
                return BOOL
            return FLOAT if FLOAT in (then, orelse) else INT
        raise TypeError(f"not a spec node: {node!r}")
