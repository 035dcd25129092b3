"""flexdsl specs as torch FlexAttention modifiers: ``to_flex(spec, params, tensors)``.

    >>> import flexdsl
    >>> from flexdsl.interop import to_flex
    >>> score_mod, mask_mod = to_flex(flexdsl.check("score + slope[h] * (kv - q) where q >= kv"),
    ...                               tensors={"slope": torch.tensor([0.5, 0.25])})
    >>> i = torch.tensor
    >>> float(score_mod(i(1.0), i(0), i(1), i(5), i(3))), bool(mask_mod(i(0), i(1), i(5), i(3)))
    (0.5, True)

Use them as ``flex_attention(q, k, v, score_mod=score_mod,
block_mask=create_block_mask(mask_mod, B, H, q_len, kv_len), enable_gqa=True)``. The two
conventions agree: flex's ``h`` is the query head, as flexdsl's is; a row with every position
masked gives output 0 and log-sum-exp -inf in both; and the log-sum-exp that flex returns
(``return_aux=AuxRequest(lse=True)``, formerly ``return_lse=True``) is natural-log based, as
flexdsl's is (checked against ``torch.logsumexp`` with torch 2.13). With torch 2.13, compiled
flex_attention on the CPU runs the forward pass only (under ``torch.no_grad()``) and cannot
return the log-sum-exp; the uncompiled one can.

The closures are built once by walking the IR, so flex traces plain tensor arithmetic; tensors
are captured, parameters and lengths are folded in as constants, and parts of the spec that
depend on neither positions nor score are computed here, in float64.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from . import ir
from .check import FLOAT, CheckedSpec
from .check import check as _check
from .eager import rounded_log2
from .errors import SpecCallError

ScoreMod = Callable[..., torch.Tensor]
MaskMod = Callable[..., torch.Tensor]

# The order of the values a compiled node reads: (score, b, h, q, kv).
_SLOTS = {ir.SCORE: 0, "b": 1, "h": 2, "q": 3, "kv": 4}


def to_flex(spec: Union[str, CheckedSpec], params: Mapping[str, Any] | None = None,
            tensors: Mapping[str, torch.Tensor] | None = None, *,
            q_len: int | None = None, kv_len: int | None = None) -> tuple[ScoreMod, MaskMod]:
    """``(score_mod, mask_mod)`` for ``torch.nn.attention.flex_attention``.

    ``score_mod(score, b, h, q_idx, kv_idx)`` returns the score expression (the score itself
    when the spec has none) in the score's dtype; ``mask_mod(b, h, q_idx, kv_idx)`` returns the
    mask (True everywhere when the spec has none). ``q_len`` and ``kv_len`` are needed only if
    the spec names them. Tensors are captured as given: put them on the device of q.
    """
    checked = spec if isinstance(spec, CheckedSpec) else _check(spec)
    values = _bind(checked, dict(params or {}), dict(tensors or {}), q_len, kv_len)
    score = _compile(checked.spec.score, values)
    mask = None if checked.spec.mask is None else _compile(checked.spec.mask, values)

    def score_mod(score_, b, h, q_idx, kv_idx):
        value = score(score_, b, h, q_idx, kv_idx) if callable(score) else score
        if isinstance(value, torch.Tensor):
            return value.to(score_.dtype)
        return torch.full_like(score_, value)

    def mask_mod(b, h, q_idx, kv_idx):
        value = True if mask is None else mask(None, b, h, q_idx, kv_idx) if callable(mask) \
            else mask
        if isinstance(value, torch.Tensor):
            return value
        return q_idx >= 0 if value else q_idx < 0

    return score_mod, mask_mod


def _bind(spec: CheckedSpec, params: dict, tensors: dict, q_len, kv_len) -> dict[str, Any]:
    """Parameters, tensors and lengths by name, judged against the signature."""
    from .bind import check_names, check_parameter
    text = spec.text
    check_names(spec, {**params, **tensors})
    values: dict[str, Any] = {}
    for name, param in spec.signature.params.items():
        if name not in params:
            raise SpecCallError(f"missing parameter '{name}' ({param.dtype})", spec=text,
                                span=param.span, hint=f"pass params={{'{name}': ...}}")
        values[name] = check_parameter(spec, name, params[name])
    for name, tensor in spec.signature.tensors.items():
        span = tensor.uses[0].span
        value = tensors.get(name)
        if not isinstance(value, torch.Tensor):
            raise SpecCallError(f"missing tensor '{name}' ({tensor.dtype}, rank {tensor.rank})",
                                spec=text, span=span, hint=f"pass tensors={{'{name}': ...}}")
        if value.dim() != tensor.rank:
            raise SpecCallError(f"'{name}' has {value.dim()} dimensions; the spec indexes it "
                                f"with {tensor.rank}", spec=text, span=span)
        if (tensor.dtype == FLOAT) != value.is_floating_point():
            raise SpecCallError(f"'{name}' must hold {tensor.dtype}s, got {value.dtype}",
                                spec=text, span=span)
        values[name] = value
    for name, length in (("q_len", q_len), ("kv_len", kv_len)):
        uses = [n for n in _walk_spec(spec) if isinstance(n, ir.Name) and n.id == name]
        if uses and length is None:
            raise SpecCallError(f"the spec uses {name}: pass {name}= to to_flex", spec=text,
                                span=uses[0].span)
        values[name] = length
    return values


def _walk_spec(spec: CheckedSpec):
    for part in (spec.spec.score, spec.spec.mask):
        if part is not None:
            yield from ir.walk(part)


# ----------------------------------------------------------------------------------------------
# IR -> closures. A compiled node is a constant (a Python number or bool) or a function of
# (score, b, h, q, kv); constants fold, so a function only ever meets tensors and numbers.

def _compile(node: ir.Expr, values: Mapping[str, Any]):
    if isinstance(node, ir.Num):
        return node.value
    if isinstance(node, ir.Const):
        return ir.CONSTANTS[node.name]
    if isinstance(node, ir.Name):
        if node.id in _SLOTS:
            slot = _SLOTS[node.id]
            return lambda *env: env[slot]
        return values[node.id]
    if isinstance(node, ir.Lookup):
        return _lookup(values[node.tensor], [_compile(i, values) for i in node.indices])
    if isinstance(node, ir.Unary):
        return _apply(_not if node.op == "not" else _negate, [_compile(node.operand, values)])
    if isinstance(node, ir.Binary):
        return _apply(_BINARY[node.op], [_compile(node.left, values),
                                         _compile(node.right, values)])
    if isinstance(node, ir.Compare):
        operands = [_compile(o, values) for o in node.operands]
        result = None
        for op, left, right in zip(node.ops, operands, operands[1:]):
            part = _apply(_COMPARISONS[op], [left, right])
            result = part if result is None else _apply(_BINARY["and"], [result, part])
        return result
    if isinstance(node, ir.Call):
        inner = node.args[0]
        if node.func in ("floor", "ceil") and isinstance(inner, ir.Call) and inner.func == "log2":
            # Exact at and near powers of two, as the kernels and the reference compute it.
            rounding = node.func
            return _apply(lambda x: rounded_log2(_float(x), rounding).to(torch.int64),
                          [_compile(inner.args[0], values)])
        return _apply(_FUNCTIONS[node.func], [_compile(a, values) for a in node.args])
    if isinstance(node, ir.IfElse):
        return _apply(_where, [_compile(node.test, values), _compile(node.then, values),
                               _compile(node.orelse, values)])
    raise TypeError(f"not a spec node: {node!r}")


def _apply(function: Callable, args: list):
    """``function`` over compiled arguments: a constant if they all are, else a closure."""
    if not any(callable(a) for a in args):
        return _constant(function, args)
    getters = [a if callable(a) else (lambda *env, a=a: a) for a in args]
    if len(getters) == 1:
        (first,) = getters
        return lambda *env: function(first(*env))
    if len(getters) == 2:
        first, second = getters
        return lambda *env: function(first(*env), second(*env))
    return lambda *env: function(*(g(*env) for g in getters))


def _constant(function: Callable, args: list):
    """Fold a node of constants now, in float64 so that no precision is lost before flex."""
    tensors = [torch.tensor(a, dtype=torch.float64 if isinstance(a, float) else None)
               for a in args]
    value = function(*tensors)
    return value.item() if isinstance(value, torch.Tensor) else value


def _lookup(table: torch.Tensor, indices: list):
    # Never folded, even with constant indices: the table may be a learned tensor.
    getters = [i if callable(i) else (lambda *env, i=i: i) for i in indices]
    if len(getters) == 1:
        (index,) = getters
        return lambda *env: table[index(*env)]
    return lambda *env: table[tuple(g(*env) for g in getters)]


def _float(x):
    return x if not isinstance(x, torch.Tensor) or x.is_floating_point() else x.float()


def _not(x):
    return torch.logical_not(x) if isinstance(x, torch.Tensor) else not x


def _negate(x):
    return -x


def _where(test, then, orelse):
    if not isinstance(test, torch.Tensor):
        return then if test else orelse
    return torch.where(test, then, orelse)


def _extreme(pick: Callable, clamp_key: str):
    def function(*args):
        out = args[0]
        for other in args[1:]:
            if isinstance(out, torch.Tensor) and isinstance(other, torch.Tensor):
                out = pick(out, other)
            elif isinstance(out, torch.Tensor):
                out = torch.clamp(out, **{clamp_key: other})
            else:
                out = torch.clamp(other, **{clamp_key: out})
        return out
    return function


_minimum = _extreme(torch.minimum, "max")
_maximum = _extreme(torch.maximum, "min")


def _rounded(function: Callable):
    def rounded(x):
        return function(x).to(torch.int64) if x.is_floating_point() else x
    return rounded


_BINARY: dict[str, Callable] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: _float(a) / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b,
    "**": lambda a, b: a ** b, "and": lambda a, b: a & b, "or": lambda a, b: a | b,
}
_COMPARISONS: dict[str, Callable] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
_FUNCTIONS: dict[str, Callable] = {
    "abs": torch.abs, "min": _minimum, "max": _maximum,
    "clamp": lambda x, low, high: _minimum(_maximum(x, low), high),
    "exp": lambda x: torch.exp(_float(x)), "exp2": lambda x: torch.exp2(_float(x)),
    "log": lambda x: torch.log(_float(x)), "log2": lambda x: torch.log2(_float(x)),
    "sqrt": lambda x: torch.sqrt(_float(x)), "rsqrt": lambda x: torch.rsqrt(_float(x)),
    "tanh": lambda x: torch.tanh(_float(x)), "sigmoid": lambda x: torch.sigmoid(_float(x)),
    "floor": _rounded(torch.floor), "ceil": _rounded(torch.ceil),
}

__all__ = ["to_flex"]
