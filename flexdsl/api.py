"""The public entry points: parse, check, compile and load -> Attention."""
from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass
from typing import Any, Mapping, Union

from . import ir
from .analysis import (IndexRange, ValueRange, checked_by_evaluation, index_ranges,
                       value_ranges)
from .bind import (KERNEL_INTEGERS, TORCH_INTEGERS, Bound, EvaluatedChecks, bind, check_names,
                   check_parameter)
from .check import CheckedSpec
from .check import check as _check
from .errors import SpecCallError, SpecError
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
    if not isinstance(spec, (str, ir.Spec)):
        raise SpecError(f"a spec is text, got {type(spec).__name__}",
                        hint='e.g. flexdsl.compile("where q >= kv")')
    return _checked(spec) if isinstance(spec, str) else _check(spec)


@functools.lru_cache(maxsize=256)
def _checked(text: str) -> CheckedSpec:
    return _check(text)


def _ranges(spec: CheckedSpec) -> tuple[tuple[IndexRange, ...], tuple[ValueRange, ...]]:
    """The spec's index ranges and value ranges. They keep spans into the spec's own text, so
    they are cached per text, not per form."""
    if spec is _checked(spec.text):
        return _ranges_of_text(spec.text)
    return tuple(index_ranges(spec)), tuple(value_ranges(spec))


@functools.lru_cache(maxsize=256)
def _ranges_of_text(text: str) -> tuple[tuple[IndexRange, ...], tuple[ValueRange, ...]]:
    spec = _checked(text)
    return tuple(index_ranges(spec)), tuple(value_ranges(spec))


def _ranges_where_kept(spec: CheckedSpec, analysis) -> dict[tuple, IndexRange]:
    """The index ranges with the score's narrowed to where the mask keeps a position, by
    (tensor, dim, index). Solving the mask costs ~1 s of sympy: only when a call's whole
    range fails, or ``flexdsl check`` prints them."""
    if spec is _checked(spec.text):
        return _ranges_where_kept_of_text(spec.text)
    return {(r.tensor, r.dim, r.index): r for r in index_ranges(spec, analysis.by_query)}


@functools.lru_cache(maxsize=256)
def _ranges_where_kept_of_text(text: str) -> dict[tuple, IndexRange]:
    spec = _checked(text)
    return {(r.tensor, r.dim, r.index): r
            for r in index_ranges(spec, _analysis_of_text(text).by_query)}


@functools.lru_cache(maxsize=256)
def _analysis_of_text(text: str):
    from .analysis.plan import MaskAnalysis
    return MaskAnalysis.of(_checked(text))


@functools.lru_cache(maxsize=256)
def _derivatives_of_text(text: str):
    from .analysis.derivatives import score_derivatives
    return score_derivatives(_checked(text))


@dataclass(frozen=True)
class KernelOptions:
    """How to run: ``backend`` is "auto" (Triton kernels on CUDA tensors but float64, the
    chunked PyTorch path elsewhere), "triton" (kernels always, float64 computed in float32; on a
    CPU that needs TRITON_INTERPRET=1) or "torch" (the chunked path always). Tile
    configurations override the defaults per pass."""
    backend: str = "auto"
    forward: Any = None    # flexdsl.kernel.launch.Config
    dq: Any = None
    dkdv: Any = None

    def __post_init__(self):
        if self.backend not in ("auto", "triton", "torch"):
            raise SpecError(f"unknown backend {self.backend!r}",
                            hint="backends are 'auto', 'triton' and 'torch'")


class Attention:
    """A compiled spec: call it like attention, ``attn(q, k, v, W=512, doc=doc)``.

    Parameters and tensors given to :func:`compile` are defaults; those given to a call take
    precedence. q is (B, Hq, Sq, D), k and v are (B, Hkv, Skv, D) with Hq a multiple of Hkv.
    A new length or parameter value never compiles anything again (but once, the forward for
    up to 1024 keys). ``defaults`` is read-only: calls are prepared with it.
    """

    def __init__(self, spec: CheckedSpec, defaults: Mapping[str, Any],
                 options: KernelOptions | None = None):
        self.spec = spec
        self.defaults = types.MappingProxyType(dict(defaults))
        self.options = options or KernelOptions()
        self._derive_checks()
        self._kernel_keys: dict = {}
        self._ranges_passed: set = set()
        self._kernel_calls: dict = {}

    def __getstate__(self):
        """Copies (deepcopy, pickle) leave the prepared launches behind: they hold compiled
        kernels, and a copy prepares its own; so do the keys into the kernels' registry,
        which a new process starts empty. The index ranges hold generated functions, which
        pickle cannot name: a copy derives them again from the spec (so too the value ranges
        and the checks by evaluation)."""
        state = dict(self.__dict__, defaults=dict(self.defaults), _kernel_calls={},
                     _kernel_keys={})
        del state["index_ranges"], state["value_ranges"], state["_evaluated"]
        del state["_ranges_where_kept"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, defaults=types.MappingProxyType(state["defaults"]))
        self._derive_checks()

    def _derive_checks(self):
        """What the calls check, from the spec: index and value ranges, and the checks by
        evaluation (with what they last passed, per Attention)."""
        self.index_ranges, self.value_ranges = _ranges(self.spec)
        self._ranges_where_kept = None   # solved on the first call whose ranges fail
        checks = checked_by_evaluation(self.spec, self.index_ranges)
        self._evaluated = EvaluatedChecks(self.spec, checks) if checks else None

    @property
    def analysis(self):
        """The mask solved for kv per query and for q per key (cached per spec text)."""
        from .analysis.plan import MaskAnalysis
        if self.spec is _checked(self.spec.text):
            return _analysis_of_text(self.spec.text)
        return MaskAnalysis.of(self.spec)

    @property
    def derivatives(self):
        from .analysis.derivatives import score_derivatives
        if self.spec is _checked(self.spec.text):
            return _derivatives_of_text(self.spec.text)
        return score_derivatives(self.spec)

    def plan(self, q_len: int, kv_len: int | None = None, *, block_m: int = 128,
             block_n: int = 128, batch: int = 1, heads: int = 1, **params_and_tensors):
        """The tile plan for these lengths and tiles: ``print(attn.plan(4096, W=512))``."""
        from .analysis.plan import plan
        kv_len = q_len if kv_len is None else kv_len
        names = {**self.defaults, **params_and_tensors}
        try:
            check_names(self.spec, names)
            params = {n: check_parameter(self.spec, n, names[n])
                      for n in self.spec.signature.params if n in names}
            missing = [n for n in (*self.spec.signature.params, *self.spec.signature.tensors)
                       if n not in names]
            if missing:
                raise SpecError(f"the plan needs {', '.join(missing)}",
                                hint="pass them as keyword arguments")
            tensors = {n: names[n] for n in self.spec.signature.tensors}
            return plan(self.spec, q_len, kv_len, block_m=block_m, block_n=block_n,
                        params=params, tensors=tensors, batch=batch, heads=heads,
                        analysis=self.analysis)
        except SpecError as error:
            raise error.with_spec(self.spec.text) from None

    def to_flex(self, *, q_len: int | None = None, kv_len: int | None = None,
                **params_and_tensors):
        """``(score_mod, mask_mod)`` for ``torch.nn.attention.flex_attention`` computing this
        spec with these parameters and tensors (``q_len``/``kv_len`` if the spec uses them)."""
        from .interop import to_flex
        given = {**self.defaults, **params_and_tensors}
        try:
            check_names(self.spec, given)
        except SpecError as error:
            raise error.with_spec(self.spec.text) from None
        params = self.spec.signature.params
        return to_flex(self.spec, {n: v for n, v in given.items() if n in params},
                       {n: v for n, v in given.items() if n not in params},
                       q_len=q_len, kv_len=kv_len)

    def _uses_kernels(self, q) -> bool:
        if self.options.backend == "auto":
            # float64 stays on the PyTorch path, which computes in it: the kernels compute
            # in float32 (their matrix products take 16- and 32-bit floats).
            return q.is_cuda and q.dtype.itemsize < 8
        return self.options.backend == "triton"

    def _kernel_key(self, dtype) -> str:
        key = self._kernel_keys.get(dtype)
        if key is None:
            key = self._kernel_keys[dtype] = self._register_kernels(dtype)
        return key

    def _register_kernels(self, dtype) -> str:
        import torch

        from .kernel import compile as kernel_compile
        from .kernel import launch, ops
        fast_tanh = dtype in (torch.float16, torch.bfloat16) and not kernel_compile.interpreting()
        key = repr((str(self.spec), fast_tanh, kernel_compile.interpreting(),
                    self.options.forward, self.options.dq, self.options.dkdv))
        if key not in ops.registry:
            kernels = kernel_compile.compiled(self.spec, self.analysis, self.derivatives,
                                              fast_tanh=fast_tanh)
            signature = self.spec.signature
            ops.registry[key] = ops.Entry(
                kernels, self.analysis, tuple(signature.params),
                frozenset(n for n, p in signature.params.items() if p.dtype == "int"),
                tuple(signature.tensors),
                launch.Configs(self.options.forward, self.options.dq, self.options.dkdv)
                if self.options.forward or self.options.dq or self.options.dkdv else None)
        return key

    def __repr__(self) -> str:
        return f"flexdsl.Attention({str(self.spec)!r})"

    def bind(self, q, k, v, *, scale=None, **params_and_tensors) -> Bound:
        return self._bind(q, k, v, scale, params_and_tensors, TORCH_INTEGERS)

    def _bind(self, q, k, v, scale, given: dict, integer_limit: int) -> Bound:
        return bind(self.spec, self.index_ranges, q, k, v, scale=scale,
                    defaults=self.defaults, given=given, passed=self._ranges_passed,
                    values=self.value_ranges, integer_limit=integer_limit,
                    where_kept=self.index_range_where_kept)

    def index_range_where_kept(self, r: IndexRange) -> IndexRange:
        """``r`` (one of ``index_ranges``), narrowed to the positions the mask keeps where it
        indexes the score only: what both paths need valid."""
        if self.spec.spec.mask is None or r.low is None:
            return r
        if self._ranges_where_kept is None:
            self._ranges_where_kept = _ranges_where_kept(self.spec, self.analysis)
        return self._ranges_where_kept.get((r.tensor, r.dim, r.index), r)

    def __call__(self, q, k, v, *, scale=None, return_lse: bool = False,
                 **params_and_tensors):
        key = _call_key(q, k, v, scale, params_and_tensors)
        known = self._kernel_calls.get(key) if key is not None else None
        if known is not None:
            if self._evaluated is None:
                out, lse = known.run(q, k, v, known.tensor_list(params_and_tensors))
            else:
                tensors = known.tensors(params_and_tensors)
                self._evaluated(q, k, known.params, tensors)
                out, lse = known.run(q, k, v, list(tensors.values()))
        else:
            out, lse = self._call(q, k, v, scale, params_and_tensors, key)
        return (out, lse) if return_lse else out

    def _call(self, q, k, v, scale, given: dict, key):
        """A call checked in full (``bind``); on the kernels, remembered by its key so that a
        call like it skips the checks and goes straight to its launches."""
        on_kernels = self._uses_kernels(q) if hasattr(q, "is_cuda") else False
        bound = self._bind(q, k, v, scale, given,
                           KERNEL_INTEGERS if on_kernels else TORCH_INTEGERS)
        if not on_kernels:
            from .kernel import cpu
            tile_plan = self.plan(bound.q_len, bound.kv_len, block_m=cpu.BLOCK_M,
                                  block_n=cpu.BLOCK_N, batch=bound.batch, heads=bound.heads,
                                  **bound.params, **bound.tensors)
            return cpu.attention(bound, tile_plan.kv_blocks)
        if bound.v.shape[3] != bound.head_dim:
            raise SpecCallError(
                f"v has head dim {bound.v.shape[3]} and q {bound.head_dim}: the kernels "
                "need them equal", spec=self.spec.text,
                hint="pad v's last dimension to q's and slice the output, or run "
                     "KernelOptions(backend='torch')")
        import torch

        from .kernel import compile as kernel_compile
        from .kernel import ops
        if not q.is_cuda and not kernel_compile.interpreting():
            raise SpecCallError(
                f"the Triton kernels need CUDA tensors, and q is on {q.device}",
                spec=self.spec.text,
                hint="move q, k and v to the GPU; on a CPU use KernelOptions(backend='torch') "
                     "(or set TRITON_INTERPRET=1 before importing triton, to debug the kernels)")
        kernels = self._kernel_key(q.dtype)
        tensors = [bound.tensors[n] for n in self.spec.signature.tensors]
        params = [float(bound.params[n]) for n in self.spec.signature.params]
        if torch.compiler.is_compiling():
            return ops.attention(q, k, v, tensors, params, kernels, bound.scale)
        if self._evaluated is not None:
            self._evaluated(q, k, bound.params, bound.tensors)
        entry = ops.registry[kernels]
        prepared = entry.prepared(q, k, v, bound.scale, params)
        result = ops.run(q, k, v, tensors, entry, prepared)
        if key is not None:
            if len(self._kernel_calls) > 64:
                self._kernel_calls.clear()
            sources = tuple((n, self.defaults.get(n)) for n in self.spec.signature.tensors)
            self._kernel_calls[key] = _KernelCall(entry, prepared, sources, bound.params)
        return result

    def reference(self, q, k, v, *, scale=None, dtype="float64", **params_and_tensors):
        """The dense oracle on the same inputs: (out, lse), in float64 unless told otherwise."""
        import torch

        from . import reference
        bound = self.bind(q, k, v, scale=scale, **params_and_tensors)
        dtype = None if dtype is None else getattr(torch, dtype, None) if isinstance(dtype, str) \
            else dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SpecCallError(f"the reference computes in a float dtype, not {dtype!r}",
                                spec=self.spec.text, hint="dtype='float64' (the default), "
                                "'float32', or None for q's dtype")
        return reference.attention(self.spec, bound.q, bound.k, bound.v, scale=bound.scale,
                                   params=bound.params, tensors=bound.tensors, dtype=dtype)


def _call_key(q, k, v, scale, given: Mapping[str, Any]):
    """What decides whether a call passes the checks and how it launches: the geometry,
    dtypes and devices of q, k, v and the tensors, the scale and the parameters (with their
    types: 2 is not 2.0). Calls that share it share their checks' outcome and launches. None
    where an argument is of another kind (a bool, a numpy number, or anything while
    torch.compile traces): such calls are checked in full."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(q, torch.Tensor) or torch.compiler.is_compiling():
        return None
    try:
        key = [q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype,
               v.dtype, q.device, k.device, v.device, scale.__class__, scale]
    except AttributeError:
        return None
    if scale.__class__ not in _NUMBERS:
        return None
    for name, value in given.items():
        key.append(name)
        if isinstance(value, torch.Tensor):
            key.append((value.shape, value.dtype, value.device))
        elif value.__class__ in _NUMBERS:
            key.append((value.__class__, value))
        else:
            return None
    return tuple(key)


_NUMBERS = (int, float, type(None))


@dataclass(frozen=True)
class _KernelCall:
    """A call key's launches: its kernels' entry, the prepared launches, and where each of the
    spec's tensors comes from (the call, else the compiled default)."""
    entry: Any
    prepared: Any
    tensor_sources: tuple
    params: Mapping   # the call's parameters, defaults included

    def tensors(self, given: Mapping[str, Any]) -> dict:
        """The spec's tensors by name, in the signature's order."""
        return {name: given.get(name, default) for name, default in self.tensor_sources}

    def tensor_list(self, given: Mapping[str, Any]) -> list:
        return [given.get(name, default) for name, default in self.tensor_sources]

    def run(self, q, k, v, tensors: list):
        from .kernel import ops
        return ops.run(q, k, v, tensors, self.entry, self.prepared)


def load(source, key: str | None = None, **params_and_tensors) -> Attention:
    """An :class:`Attention` from a spec file, a table in a TOML/YAML/JSON config, or a dict.

    ``key`` selects a table by dotted path (``"model.attention"``); the table's parameters are
    defaults that keyword arguments override. Errors point at the file, line and column.
    """
    from .config import load as load_config
    return load_config(source, key, **params_and_tensors)


def compile(spec: SpecLike, *, options: KernelOptions | None = None,  # noqa: A001
            **params_and_tensors) -> Attention:
    """Check ``spec`` and bind default parameters and tensors: an :class:`Attention`.

    >>> attn = compile("where 0 <= q - kv < W", W=256)
    >>> attn.spec.signature.params["W"].dtype
    'int'
    """
    checked = check(spec)
    if options is not None and not isinstance(options, KernelOptions):
        raise SpecError(f"options must be a flexdsl.KernelOptions, got {options!r}",
                        spec=checked.text,
                        hint=f"options=flexdsl.KernelOptions(backend={options!r})"
                        if options in ("auto", "triton", "torch") else None)
    try:
        check_names(checked, params_and_tensors)
        defaults = {}
        for name, value in params_and_tensors.items():
            if name in checked.signature.params:
                value = check_parameter(checked, name, value)
            defaults[name] = value
    except SpecError as error:
        raise error.with_spec(checked.text) from None
    return Attention(checked, defaults, options)
