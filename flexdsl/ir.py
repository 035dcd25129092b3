"""The spec's syntax tree: frozen nodes, one per construct, and ``unparse``.

Nodes carry the source span they were parsed from, but spans take no part in equality or
hashing, so ``parse(unparse(x)) == x`` compares structure alone. Nodes hold no behaviour;
each stage walks them with its own functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Union

Span = tuple[int, int]

# Names with a fixed meaning; every other bare name is a parameter.
POSITIONS = ("b", "h", "q", "kv")
LENGTHS = ("q_len", "kv_len")
SCORE = "score"
CONSTANTS = {"inf": math.inf, "pi": math.pi}
KEYWORDS = ("and", "or", "not", "if", "else", "where")
RESERVED = (SCORE, *POSITIONS, *LENGTHS, *CONSTANTS, *KEYWORDS)


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Num:
    """An integer or float literal."""
    value: Union[int, float]
    span: Span | None = _span()

    # 2 and 2.0 are different literals (one is an int, the other a float: 'q // 2.0' is an
    # error), though Python finds them equal.
    def __eq__(self, other) -> bool:
        return (type(other) is Num and type(self.value) is type(other.value)
                and self.value == other.value)

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))


@dataclass(frozen=True)
class Const:
    """A named constant: ``inf`` or ``pi``."""
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    """``score``, a position, a length or a parameter."""
    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Lookup:
    """``tensor[i, j, ...]``: a tensor passed at call time, indexed by integer expressions."""
    tensor: str
    indices: tuple["Expr", ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Unary:
    """``-x`` or ``not x``."""
    op: str
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Binary:
    """Arithmetic (``+ - * / // % **``) and the connectives ``and``, ``or``."""
    op: str
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()
    op_span: Span | None = _span()


@dataclass(frozen=True)
class Compare:
    """A comparison chain: ``0 <= q - kv < W`` is operands (0, q - kv, W), ops (<=, <)."""
    operands: tuple["Expr", ...]
    ops: tuple[str, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    """``func(arg, ...)`` for a function of the table in ``check.FUNCTIONS``."""
    func: str
    args: tuple["Expr", ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class IfElse:
    """``then if test else orelse``."""
    then: "Expr"
    test: "Expr"
    orelse: "Expr"
    span: Span | None = _span()


Expr = Union[Num, Const, Name, Lookup, Unary, Binary, Compare, Call, IfElse]


@dataclass(frozen=True)
class Spec:
    """A whole spec: the score expression and the mask (``None``: nothing is masked)."""
    score: Expr
    mask: Expr | None
    text: str = field(default="", compare=False, repr=False)

    def __str__(self) -> str:
        return unparse(self)


def children(node: Expr) -> tuple[Expr, ...]:
    """The direct sub-expressions of ``node``, in source order."""
    if isinstance(node, Lookup):
        return node.indices
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, Compare):
        return node.operands
    if isinstance(node, Call):
        return node.args
    if isinstance(node, IfElse):
        return (node.then, node.test, node.orelse)
    return ()


def walk(node: Expr) -> Iterator[Expr]:
    """Every node under ``node``, itself first, depth first in source order."""
    yield node
    for child in children(node):
        yield from walk(child)


def names(*nodes: Expr) -> set[str]:
    """The names (positions, lengths, parameters, score) that ``nodes`` use."""
    return {n.id for node in nodes for n in walk(node) if isinstance(n, Name)}


# ----------------------------------------------------------------------------------------------
# unparse: the normalised text of a node, with the fewest parentheses that keep its structure.

_COND, _OR, _AND, _NOT, _CMP, _ADD, _MUL, _NEG, _POW, _ATOM = range(1, 11)
_BINARY_PRECEDENCE = {"or": _OR, "and": _AND, "+": _ADD, "-": _ADD,
                      "*": _MUL, "/": _MUL, "//": _MUL, "%": _MUL, "**": _POW}


def precedence(node: Expr) -> int:
    if isinstance(node, IfElse):
        return _COND
    if isinstance(node, Binary):
        return _BINARY_PRECEDENCE[node.op]
    if isinstance(node, Unary):
        return _NOT if node.op == "not" else _NEG
    if isinstance(node, Compare):
        return _CMP
    return _ATOM


def _number(value: Union[int, float]) -> str:
    if isinstance(value, bool):
        raise TypeError("booleans are not literals of the spec language")
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text


def unparse(node: Union[Expr, Spec]) -> str:
    """The normalised text of a node or a whole spec.

    >>> from flexdsl.grammar import parse
    >>> unparse(parse("score+slope[h]*(kv-q) where q>=kv"))
    'score + slope[h] * (kv - q) where q >= kv'
    """
    if isinstance(node, Spec):
        mask = None if node.mask is None else unparse(node.mask)
        if mask is None:
            return unparse(node.score)
        if node.score == Name(SCORE):
            return f"where {mask}"
        return f"{unparse(node.score)} where {mask}"
    return _unparse(node)


def _wrap(node: Expr, minimum: int) -> str:
    text = _unparse(node)
    return f"({text})" if precedence(node) < minimum else text


def _unparse(node: Expr) -> str:
    if isinstance(node, Num):
        return _number(node.value)
    if isinstance(node, Const):
        return node.name
    if isinstance(node, Name):
        return node.id
    if isinstance(node, Lookup):
        return f"{node.tensor}[{', '.join(_unparse(i) for i in node.indices)}]"
    if isinstance(node, Call):
        return f"{node.func}({', '.join(_unparse(a) for a in node.args)})"
    if isinstance(node, Unary):
        if node.op == "not":
            return f"not {_wrap(node.operand, _NOT)}"
        return f"-{_wrap(node.operand, _NEG)}"
    if isinstance(node, Binary):
        p = _BINARY_PRECEDENCE[node.op]
        if node.op == "**":  # right-associative; its base binds tighter than unary minus
            return f"{_wrap(node.left, _ATOM)} ** {_wrap(node.right, _NEG)}"
        return f"{_wrap(node.left, p)} {node.op} {_wrap(node.right, p + 1)}"
    if isinstance(node, Compare):
        parts = [_wrap(node.operands[0], _ADD)]
        for op, operand in zip(node.ops, node.operands[1:]):
            parts.append(f"{op} {_wrap(operand, _ADD)}")
        return " ".join(parts)
    if isinstance(node, IfElse):
        return (f"{_wrap(node.then, _OR)} if {_wrap(node.test, _OR)} "
                f"else {_wrap(node.orelse, _COND)}")
    raise TypeError(f"not a spec node: {node!r}")
