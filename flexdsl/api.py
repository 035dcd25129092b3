"""The public entry points: parse, check, compile and load -> Attention."""
from __future__ import annotations

import functools
from typing import Any, Mapping, Union

from . import ir
from .analysis import IndexRange, index_ranges
from .bind import Bound, bind, check_names, check_parameter
from .check import CheckedSpec
from .check import check as _check
from .errors import SpecError
from .grammar import parse as _parse

SpecLike = Union[str, ir.Spec, CheckedSpec]


def parse(text: str) -> ir.Spec:
    """The syntax tree of ``text``; raises SpecSyntaxError with a caret on bad input.

    >>> str(parse("score+slope[h]*(kv-q) where q>=kv"))
    'score + slope[h] * (kv - q) where q >= kv'
    """
    return _parse(text)


def check(spec: SpecLike) -> CheckedSpec:
    """Parse (if needed) and check a spec: its types, names and signature."""
    if isinstance(spec, CheckedSpec):
        return spec
    return _checked(spec) if isinstance(spec, str) else _check(spec)


@functools.lru_cache(maxsize=256)
def _checked(text: str) -> CheckedSpec:
    return _check(text)


def _ranges(spec: CheckedSpec) -> tuple[IndexRange, ...]:
    # Ranges keep spans into the spec's own text, so they are cached per text, not per form.
    return _ranges_of_text(spec.text) if spec is _checked(spec.text) else tuple(
        index_ranges(spec))


@functools.lru_cache(maxsize=256)
def _ranges_of_text(text: str) -> tuple[IndexRange, ...]:
    return tuple(index_ranges(_checked(text)))


class Attention:
    """A compiled spec: call it like attention, ``attn(q, k, v, W=512, doc=doc)``.

    Parameters and tensors given to :func:`compile` are defaults; those given to a call take
    precedence. q is (B, Hq, Sq, D), k and v are (B, Hkv, Skv, D) with Hq a multiple of Hkv.
    """

    def __init__(self, spec: CheckedSpec, defaults: Mapping[str, Any]):
        self.spec = spec
        self.defaults = dict(defaults)
        self.index_ranges = _ranges(spec)

    def __repr__(self) -> str:
        return f"flexdsl.Attention({str(self.spec)!r})"

    def bind(self, q, k, v, *, scale=None, **params_and_tensors) -> Bound:
        return bind(self.spec, list(self.index_ranges), q, k, v, scale=scale,
                    defaults=self.defaults, given=params_and_tensors)

    def __call__(self, q, k, v, *, scale=None, return_lse: bool = False,
                 **params_and_tensors):
        bound = self.bind(q, k, v, scale=scale, **params_and_tensors)
        from .kernel import cpu
        out, lse = cpu.attention(bound)
        return (out, lse) if return_lse else out

    def reference(self, q, k, v, *, scale=None, dtype="float64", **params_and_tensors):
        """The dense oracle on the same inputs: (out, lse), in float64 unless told otherwise."""
        import torch

        from . import reference
        bound = self.bind(q, k, v, scale=scale, **params_and_tensors)
        dtype = None if dtype is None else getattr(torch, dtype) if isinstance(dtype, str) \
            else dtype
        return reference.attention(self.spec, bound.q, bound.k, bound.v, scale=bound.scale,
                                   params=bound.params, tensors=bound.tensors, dtype=dtype)


def compile(spec: SpecLike, **params_and_tensors) -> Attention:  # noqa: A001 - the API's verb
    """Check ``spec`` and bind default parameters and tensors: an :class:`Attention`.

    >>> attn = compile("where 0 <= q - kv < W", W=256)
    >>> attn.spec.signature.params["W"].dtype
    'int'
    """
    checked = check(spec)
    try:
        check_names(checked, params_and_tensors)
        defaults = {}
        for name, value in params_and_tensors.items():
            if name in checked.signature.params:
                value = check_parameter(checked, name, value)
            defaults[name] = value
    except SpecError as error:
        raise error.with_spec(checked.text) from None
    return Attention(checked, defaults)
