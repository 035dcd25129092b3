"""A call's inputs judged against a spec's signature: q, k, v, parameters and tensors.

Everything a call can get wrong is a SpecCallError naming the tensor or parameter, and where a
spec element is at fault (a parameter's first use, an index too large for its tensor), the
caret points at it.
"""
from __future__ import annotations

import difflib
import math
import numbers
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

from . import ir
from .analysis import EvaluatedCheck, IndexRange, ValueRange
from .check import FLOAT, INT, CheckedSpec
from .errors import SpecCallError


@dataclass
class Bound:
    """A validated call: inputs, concrete parameters and tensors, and the problem's shape."""
    spec: CheckedSpec
    q: Any
    k: Any
    v: Any
    scale: float
    params: dict[str, int | float]
    tensors: dict[str, Any]

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    def values(self) -> dict[str, int | float]:
        """Lengths, extents and parameters by name, for closed-form formulas."""
        return {"q_len": self.q_len, "kv_len": self.kv_len, "n_batch": self.batch,
                "n_heads": self.heads, **self.params}


def check_parameter(spec: CheckedSpec, name: str, value) -> int | float:
    """``value`` as the parameter ``name`` wants it, or a SpecCallError saying why not."""
    text = spec.text
    if name in spec.signature.tensors:  # e.g. ``flexdsl check ... -p doc=3``
        raise SpecCallError(f"'{name}' is a tensor, not a parameter", spec=text,
                            span=spec.signature.tensors[name].uses[0].span,
                            hint=f"pass a tensor at call time: attn(q, k, v, {name}=...)")
    param = spec.signature.params[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or _is_tensor(value):
        raise SpecCallError(
            f"parameter '{name}' must be a Python number, got {type(value).__name__}",
            spec=text, span=param.span,
            hint="parameters are scalars; a per-head or per-position value is a tensor, "
                 f"indexed in the spec like {name.lower()}s[h]")
    if param.dtype == INT:
        if not isinstance(value, numbers.Integral):
            raise SpecCallError(f"parameter '{name}' is an int, got {value!r}", spec=text,
                                span=param.span,
                                hint=f"'{name}' is used where only integers make sense "
                                     "(an index, '//', '%', or compared with positions); "
                                     "pass an int")
        if not -TORCH_INTEGERS <= value <= TORCH_INTEGERS:
            raise SpecCallError(f"parameter '{name}' is {value}, past the 64-bit integers "
                                "positions are computed in", spec=text, span=param.span,
                                hint="integer parameters must lie within +/-2**62")
        return int(value)
    value = float(value)
    if math.isnan(value):
        raise SpecCallError(f"parameter '{name}' is NaN", spec=text, span=param.span)
    return value


# The largest integer magnitude a call may reach: the GPU kernels compute positions and
# bounds in 32-bit integers (and add a few such values together), the PyTorch path in 64-bit.
KERNEL_INTEGERS = 2 ** 30
TORCH_INTEGERS = 2 ** 62


def bind(spec: CheckedSpec, ranges: list[IndexRange], q, k, v, *, scale=None,
         defaults: Mapping[str, Any] | None = None,
         given: Mapping[str, Any] | None = None, passed: set | None = None,
         values: tuple[ValueRange, ...] = (), integer_limit: int = TORCH_INTEGERS,
         where_kept=None) -> Bound:
    """Validate a call. ``defaults`` were bound at compile time; ``given`` at the call.
    ``passed`` remembers the sizes and parameters whose index ranges already checked out;
    ``values`` bounds the spec's integers (within ``integer_limit``) and divisors;
    ``where_kept`` narrows an index range that fails to where the mask keeps a position."""
    text = spec.text
    _check_qkv(q, k, v, text)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise SpecCallError(f"scale must be a number, got {type(scale).__name__}", spec=text)
    elif not math.isfinite(scale):
        raise SpecCallError(f"scale is {scale}", spec=text,
                            hint="the softmax scale must be finite (default 1/sqrt(head_dim))")
    names = {**(defaults or {}), **(given or {})}
    check_names(spec, names)
    params, tensors = {}, {}
    for name, param in spec.signature.params.items():
        if name not in names:
            raise SpecCallError(
                f"missing parameter '{name}' ({param.dtype})", spec=text, span=param.span,
                hint=f"pass {name}=... to flexdsl.compile(...) or to the call")
        params[name] = check_parameter(spec, name, names[name])
    for name, tensor in spec.signature.tensors.items():
        use = tensor.uses[0]
        if name not in names:
            raise SpecCallError(
                f"missing tensor '{name}' ({tensor.dtype}, rank {tensor.rank})", spec=text,
                span=use.span, hint=f"pass {name}=<tensor> to the call")
        tensors[name] = _check_tensor(spec, name, names[name], q)
    bound = Bound(spec, q, k, v, float(scale), params, tensors)
    if ranges or values:
        _check_ranges(bound, ranges, passed, values, integer_limit, where_kept)
    return bound


def check_names(spec: CheckedSpec, names: Mapping[str, Any]) -> None:
    known = [*spec.signature.params, *spec.signature.tensors]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = (f"did you mean '{close[0]}'?" if close else
                    f"this spec takes {', '.join(known)}" if known else
                    "this spec takes no parameters or tensors")
            raise SpecCallError(f"unknown parameter or tensor '{name}'", spec=spec.text,
                                hint=hint)


def _is_tensor(value) -> bool:
    # flexdsl imports torch only when it needs it: until torch is loaded, nothing is a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _check_qkv(q, k, v, text: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _is_tensor(t):
            raise SpecCallError(f"{name} must be a torch.Tensor, got {type(t).__name__}",
                                spec=text)
        if t.dim() != 4:
            raise SpecCallError(
                f"{name} must have 4 dimensions (batch, heads, length, head_dim), "
                f"got shape {tuple(t.shape)}", spec=text)
        # float16, bfloat16, float32, float64: the float dtypes of two bytes or more
        # (not float8), a test that torch.compile traces without a warning.
        if not (t.dtype.is_floating_point and t.dtype.itemsize >= 2):
            raise SpecCallError(f"{name} has dtype {t.dtype}; flexdsl takes float16, "
                                f"bfloat16, float32 or float64", spec=text)
    if q.shape[3] == 0:
        raise SpecCallError("q and k have head dim 0", spec=text,
                            hint="attention needs at least one feature per head")
    if q.device.type == "meta":
        raise SpecCallError("q, k and v are on the meta device, which holds no values",
                            spec=text, hint="pass tensors with data (cpu or cuda)")
    if not (q.dtype == k.dtype == v.dtype):
        raise SpecCallError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}", spec=text, hint="cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise SpecCallError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                            f"{v.device}", spec=text)
    if k.shape[:3] != v.shape[:3]:
        raise SpecCallError(f"k and v must agree in batch, heads and length, got "
                            f"{tuple(k.shape)} and {tuple(v.shape)}", spec=text)
    if q.shape[0] != k.shape[0]:
        raise SpecCallError(f"q and k have batch sizes {q.shape[0]} and {k.shape[0]}",
                            spec=text)
    if q.shape[3] != k.shape[3]:
        raise SpecCallError(f"q and k have head dims {q.shape[3]} and {k.shape[3]}",
                            spec=text)
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise SpecCallError(
            f"q has {q.shape[1]} heads, k and v {k.shape[1]}: for grouped-query attention "
            f"the query heads must be a multiple of the key heads", spec=text)


# Integer dtypes torch compares and indexes with too little support (no CPU comparison for
# the wide unsigned ones), and bool.
_NOT_INDEX_DTYPES = {"torch.bool", "torch.uint16", "torch.uint32", "torch.uint64"}


def _check_tensor(spec: CheckedSpec, name: str, value, q):
    tensor = spec.signature.tensors[name]
    span = tensor.uses[0].span
    text = spec.text
    if not _is_tensor(value):
        raise SpecCallError(f"'{name}' must be a torch.Tensor, got {type(value).__name__}",
                            spec=text, span=span)
    if value.dim() != tensor.rank:
        raise SpecCallError(
            f"'{name}' is indexed with {tensor.rank} index{'es' if tensor.rank > 1 else ''} "
            f"in the spec but has {value.dim()} dimensions (shape {tuple(value.shape)})",
            spec=text, span=span)
    if tensor.dtype == INT and (value.is_floating_point() or value.is_complex()
                                or str(value.dtype) in _NOT_INDEX_DTYPES):
        kind = ("must hold integers" if value.dtype.is_floating_point or value.is_complex()
                or str(value.dtype) == "torch.bool" else "must hold signed integers (or uint8)")
        raise SpecCallError(f"'{name}' {kind}, got {value.dtype}", spec=text,
                            span=span, hint=f"'{name}' is compared or used as an index; "
                                            f"pass {name}.long()")
    if tensor.dtype == FLOAT and not value.is_floating_point():
        raise SpecCallError(f"'{name}' must hold floats, got {value.dtype}", spec=text,
                            span=span, hint=f"it is combined with the score; pass "
                                            f"{name}.float()")
    if value.device != q.device:
        raise SpecCallError(f"'{name}' is on {value.device} but q is on {q.device}",
                            spec=text, span=span, hint=f"move it: {name}.to(q.device)")
    return value


def _check_ranges(bound: Bound, ranges: list[IndexRange], passed: set | None = None,
                  value_ranges: tuple[ValueRange, ...] = (),
                  integer_limit: int = TORCH_INTEGERS, where_kept=None) -> None:
    if bound.q_len == 0 or bound.kv_len == 0:
        return
    values = bound.values()
    # A training loop repeats the same lengths and parameters: check each combination once.
    key = (*values.values(), integer_limit,
           *(bound.tensors[r.tensor].shape[r.dim] for r in ranges))
    if passed is not None and key in passed:
        return
    _check_values(bound, values, value_ranges, integer_limit)
    for r in ranges:
        limits = _limits(bound, r, values)
        if limits is None:
            continue
        size = bound.tensors[r.tensor].shape[r.dim]
        if (limits[0] < 0 or limits[1] >= size) and where_kept is not None:
            r = where_kept(r)
            limits = _limits(bound, r, values)
        low, high = limits
        if (low >= 0 and high < size) or low > high:   # low > high: the mask keeps nothing
            continue
        text = ir.unparse(r.index)
        lengths = f"q_len={bound.q_len}, kv_len={bound.kv_len}"
        if low < 0:
            raise SpecCallError(
                f"index '{text}' of '{r.tensor}' goes down to {low} ({lengths}); "
                "tensors cannot be indexed below 0", spec=bound.spec.text, span=r.index.span,
                hint="shift the index so that it starts at 0 (e.g. add kv_len)")
        if high >= size:
            raise SpecCallError(
                f"'{r.tensor}' is too short: dimension {r.dim} has size {size}, but index "
                f"'{text}' reaches {high} ({lengths}), so it needs size >= {high + 1}",
                spec=bound.spec.text, span=r.index.span,
                hint=f"'{text}' spans {r.span(values)}")
    if passed is not None:
        if len(passed) > 1024:
            passed.clear()
        passed.add(key)


def _limits(bound: Bound, r: IndexRange, values: dict) -> tuple[int, int] | None:
    try:
        return r.bounds(values)
    except ValueError as why:   # a parameter made an index infinite
        raise SpecCallError(str(why), spec=bound.spec.text, span=r.index.span,
                            hint="indices must be finite integers; check the parameters"
                            ) from None


def _check_values(bound: Bound, values: dict, value_ranges, limit: int) -> None:
    """No divisor fixed by the parameters is 0, and no integer leaves ``limit``."""
    lengths = f"q_len={bound.q_len}, kv_len={bound.kv_len}"
    for r in value_ranges:
        low, high = r.bounds(values)
        text = ir.unparse(r.node)
        if r.divisor:
            if low == high == 0:
                raise SpecCallError(
                    f"division by zero in '{ir.unparse(r.division)}': '{text}' is 0 here",
                    spec=bound.spec.text, span=r.node.span, hint="pass a non-zero value")
            continue
        if -limit <= low and high <= limit:
            continue
        reach = high if high > limit else low
        where = ("the GPU kernels compute in 32-bit integers and take values within "
                 "+/-2**30" if limit < TORCH_INTEGERS else
                 "flexdsl computes in 64-bit integers and takes values within +/-2**62")
        raise SpecCallError(
            f"'{text}' reaches {reach:.4g} here ({lengths}); {where}",
            spec=bound.spec.text, span=r.node.span,
            hint="use smaller parameters" + (", or KernelOptions(backend='torch')"
                                              if limit < TORCH_INTEGERS else ""))


class EvaluatedChecks:
    """Runs ``analysis.checked_by_evaluation``'s checks before a call on the kernels, which
    would clamp such an index or divide by 0 silently, raising as the PyTorch path does: the
    score's checks where the mask keeps a position, the mask's everywhere. Once per lengths,
    parameters, tensor shapes and contents of the tensors the checks read (identity and
    version: a write through ``.data`` or numpy, which keeps the version, goes unseen, as it
    does for the document runs; under ``torch.compile`` the checks do not run)."""

    def __init__(self, spec: CheckedSpec, checks: tuple[EvaluatedCheck, ...]):
        self.spec, self.checks = spec, checks
        mask = spec.spec.mask
        read = {n.tensor for c in checks for n in ir.walk(c.node) if isinstance(n, ir.Lookup)}
        if mask is not None and any(not c.in_mask for c in checks):
            read |= {n.tensor for n in ir.walk(mask) if isinstance(n, ir.Lookup)}
        self.read = tuple(sorted(read))
        self._passed = None   # (stamp, weak references to the tensors read)

    def __call__(self, q, k, params: Mapping, tensors: Mapping) -> None:
        batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if not (batch and heads and q_len and kv_len):
            return
        used = [tensors[n] for n in self.read]
        try:
            stamp = (batch, heads, q_len, kv_len, tuple(sorted(params.items())),
                     tuple(t.shape for t in tensors.values()), tuple(t._version for t in used))
        except RuntimeError:   # an inference tensor has no version: check every call
            stamp = None
        last = self._passed
        if stamp is not None and last is not None and last[0] == stamp and all(
                ref() is t for ref, t in zip(last[1], used)):
            return
        values = {"q_len": q_len, "kv_len": kv_len, "n_batch": batch, "n_heads": heads,
                  **params}
        for check in self.checks:
            if check.slice_range is not None:
                self._check_slice(check, values, tensors)
            else:
                self._check_on_grid(check, q, k, params, tensors)
        if stamp is not None:
            self._passed = (stamp, tuple(weakref.ref(t) for t in used))

    def _check_slice(self, check: EvaluatedCheck, values: dict, tensors: Mapping) -> None:
        """``table[t[e]]``: the values of t over e's range bound the index, in O(len(t))."""
        from .eager import check_index
        low, high = check.slice_range.bounds(values)
        inner = tensors[check.node.tensor]
        part = inner[max(low, 0):min(high, inner.shape[0] - 1) + 1]
        if part.numel():
            check_index(check.context, check.dim, int(part.min()), int(part.max()),
                        tensors[check.context.tensor].shape[check.dim], self.spec.text)

    def _check_on_grid(self, check: EvaluatedCheck, q, k, params, tensors) -> None:
        import torch

        from . import eager
        batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        mask = None if check.in_mask else self.spec.spec.mask
        for start in range(0, q_len, 1024):   # (1024, kv_len) grids a step
            positions = eager.positions(batch, heads, q_len, kv_len, q.device, start,
                                        min(start + 1024, q_len))
            grid = eager.Grid(positions, params, tensors, torch.float32, None, self.spec.text)
            if mask is not None:
                grid = eager.with_mask(mask, grid)
            value = eager.kept_values(eager.evaluate(check.node, grid), grid.keep)
            if not value.numel():
                continue
            if check.kind == "divisor":
                if bool((value == 0).any()):
                    raise eager.division_by_zero(check.context, self.spec.text)
            else:
                eager.check_index(check.context, check.dim, int(value.min()),
                                  int(value.max()), tensors[check.context.tensor].shape[check.dim],
                                  self.spec.text)
