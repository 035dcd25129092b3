"""Launching the rendered kernels: argument lists, tile configurations, grids."""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from dataclasses import dataclass

import torch

from ..analysis.plan import MaskAnalysis, check_positive, document_tensors
from . import direct, hopper
from .compile import CompiledSpec, KernelTraits, interpreting


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch settings for one pass. ``tma``: read the loop's tiles through
    tensor descriptors (the copy engine) where the GPU and the tensors' strides allow."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False

    @classmethod
    def parse(cls, text: str) -> "Config":
        """From "block_m,block_n,warps,stages[,tma]" (tma 0 or 1), as the tools take it."""
        numbers = [int(x) for x in text.split(",")]
        return cls(*numbers[:4], tma=bool(numbers[4]) if len(numbers) > 4 else False)


@dataclass(frozen=True)
class Configs:
    """One configuration per kernel: forward, dq (rows are queries), dk/dv (rows are keys);
    and the forward's for key ranges up to SHORT_KEYS, where it differs."""
    forward: Config
    dq: Config
    dkdv: Config
    short_forward: Config | None = None


# Keys up to this many make a short forward loop, where a 128-row tile's pipeline and
# descriptors are not repaid in 8 steps: on the H200 (causal, B=8 H=16 S=1024 D=128, bf16)
# 64x64 tiles with 4 warps and 3 stages took 0.113 ms against 0.136 for the 128x128 default,
# and 0.128 for 128x64 (benchmarks/tune.py).
SHORT_KEYS = 1024


def default_configs(head_dim: int, dtype: torch.dtype,
                    traits: KernelTraits = KernelTraits()) -> Configs:
    """Tile configurations by head dim and kind of spec; small tiles under the interpreter
    (tests)."""
    return _default_configs(head_dim, dtype, traits, interpreting())


@functools.lru_cache(maxsize=None)
def _default_configs(head_dim: int, dtype: torch.dtype, traits: KernelTraits,
                     interpret: bool) -> Configs:
    if interpret:
        # Descriptors on, so that the CPU tests run the path the GPU takes where it can.
        small = Config(16, 16, 1, 1, tma=True)
        return Configs(small, small, small)
    return _gpu_configs(head_dim, dtype == torch.float32, traits)


def _gpu_configs(head_dim: int, wide: bool, traits: KernelTraits) -> Configs:
    # From benchmarks/tune.py on an H200 (bf16, B=2 H=16 S=4096, each benchmark case, the
    # whole backward timed per dq or dk/dv tile). What the kinds of spec asked for:
    # - sliding windows (banded): 64-row forward and dq tiles, the window's ragged edges
    #   cost less in narrower tiles (D=128 forward 0.19 -> 0.17 ms sliding, 0.29 -> 0.24
    #   dilated, 0.17 -> 0.14 neighbourhood);
    # - packed documents take them too, fewer rows of a tile straddling a boundary (forward
    #   at S=16384 0.69 -> 0.60 ms, S=4096 0.165 -> 0.162); and at D=64 both kinds take
    #   64-row forward tiles (documents 0.132 -> 0.086, dilated 0.226 -> 0.191);
    # - descriptors (the copy engine) pay in long loops (full forward 0.60 -> 0.56 ms) but
    #   cost each program their setup, which short document loops feel (0.165 -> 0.196);
    #   through them a 128x128 forward tile fits in shared memory with 3 stages, 3-7% faster
    #   than 128x64 at S=4096 and at S=16384 (causal 2.175 -> 2.030 ms at 16k);
    # - the dk/dv loop of a non-linear score (soft-capping) keeps one more [64, 64] value
    #   live and runs faster with 32-query steps (backward 1.65 -> 1.50 ms), as does a mask
    #   that divides a difference of positions, one division per element (dilated windows
    #   0.838 -> 0.749 ms; neighbourhoods, which divide q and kv apart, 0.390 -> 0.401: no);
    #   at D=64 these steps help every spec but those that divide positions (neighbourhood
    #   0.52 -> 0.69);
    # - a table read along the diagonals (a relative-position bias) spreads each tile's
    #   window with a gather through shared memory: 128x64 forward tiles, 0.78 -> 0.73 ms.
    if head_dim <= 64 and wide:
        return Configs(Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(64, 64, 4, 2))
    if head_dim <= 64:
        return Configs(Config(64, 64, 4, 3) if traits.banded or traits.documents
                       else Config(128, 64, 8, 3),
                       Config(64, 64, 4, 2 if traits.banded else 3),
                       Config(64, 64, 4, 2) if traits.divides else Config(32, 64, 4, 2, tma=True))
    if head_dim <= 128 and not wide:
        sparse = traits.banded or traits.documents
        return Configs(
            Config(64, 64, 4, 3) if sparse else Config(128, 64 if traits.diagonal else 128, 8,
                                                       3, tma=True),
            Config(64, 64, 4, 2) if sparse else Config(128, 64, 8, 3),
            Config(32 if traits.nonlinear_score or traits.divides_pairs else 64, 64, 4, 2,
                   tma=True),
            # Head dims 65-128 pad to the same 128-wide tiles as the D=128 measured.
            short_forward=None if sparse else Config(64, 64, 4, 3))
    if head_dim <= 128:
        return Configs(Config(64, 32, 4, 2), Config(64, 32, 4, 2), Config(32, 64, 4, 2))
    return Configs(Config(64, 32, 4, 2), Config(64, 16, 4, 2), Config(16, 64, 4, 2))


@dataclass(frozen=True, eq=False)
class Settings:
    """What every launch of one spec's kernels shares at one head dim, dtype and device, worked
    out once (ops.Entry keeps them): a call then computes only what its tensors decide."""
    configs: Configs
    pointer_forward: Config    # the forward's tile when k and v cannot go through descriptors
    constants: dict            # the constexprs all three passes take
    copy_engine: bool          # this device can read through tensor descriptors
    device: int | None         # the CUDA device's index, None on the CPU (interpreter)
    key: int                   # names these settings in launch keys, which must hash fast
    split_bias: bool           # the forward and dq passes split a separable bias
    split_bias_dkdv: bool      # ... and the dk/dv pass
    processors: int            # the GPU's multiprocessors: how many programs a wave holds
    forward_chosen: bool       # the caller chose the forward's tile (no Hopper forward then)

_settings_made = itertools.count()


def settings(kernels: CompiledSpec, head_dim: int, dtype: torch.dtype, device: torch.device,
             overrides: Configs | None = None) -> Settings:
    """The settings for ``kernels`` at this head dim, dtype and device; ``overrides`` replace
    the default tile configuration of the passes they name."""
    defaults = default_configs(head_dim, dtype, kernels.traits)
    # A default forward tile that is wide only because descriptors leave it the shared memory
    # narrows when they cannot be used (an older GPU, or k and v strides the copy engine
    # refuses); a tile the caller asked for stays.
    forward = defaults.forward
    pointer_forward = Config(forward.block_m, min(forward.block_n, 64), forward.num_warps,
                             forward.num_stages)
    if overrides is not None:
        # A forward tile the caller chose serves short key ranges too.
        defaults = Configs(overrides.forward or defaults.forward, overrides.dq or defaults.dq,
                           overrides.dkdv or defaults.dkdv,
                           None if overrides.forward else defaults.short_forward)
        pointer_forward = overrides.forward or pointer_forward
    interpret = interpreting()
    constants = dict(D=head_dim, HEAD_DIM=head_dim_padded(head_dim), DOT_F32=interpret,
                     IEEE=dtype == torch.float32 and not interpret)
    split, split_dkdv = split_bias(constants)
    return Settings(defaults, pointer_forward, constants, _copy_engine_for(head_dim, device),
                    device.index if device.type == "cuda" else None, next(_settings_made),
                    split, split_dkdv, _processors(device),
                    overrides is not None and overrides.forward is not None)


def _row_grid(rows: int, block: int, heads: int, processors: int) -> tuple[tuple, int]:
    """A pass's grid, one axis of row tiles x heads (``rows`` in tiles of ``block``; the kernel
    template's _tile_and_head decodes it), and the size of its head groups."""
    tiles = triton_cdiv(rows, block)
    return (tiles * heads,), wave_heads(tiles, heads, processors)


def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4   # the interpreter: small, so that the tests' grids take several head groups
    return torch.cuda.get_device_properties(device).multi_processor_count


def wave_heads(tiles: int, heads: int, processors: int) -> int:
    """How many heads' row tiles a grid whose tiles differ in work interleaves (_tile_and_head
    in the kernel template): about two programs a multiprocessor, so that each group's heavy
    tiles fill the GPU and the last wave is light tiles; no more, so that the programs in
    flight share their heads' keys in L2. A power of two: on the H200 (causal, bf16) groups
    of 3 or 9 heads ran 3-12% slower than groups of 2, 4 or 8 (S=4096: 0.180 ms forward at D=64
    in groups of 8 against 0.202 in groups of 9 and 0.210 one head at a time; S=16384 D=64
    1.33 ms in groups of 2 or 4, 1.44 in groups of 3, 1.39 one head at a time)."""
    fill = max(1, 2 * processors // tiles)
    return min(heads, 1 << (fill.bit_length() - 1))


def split_bias(constants: dict) -> tuple[bool, bool]:
    """Whether the forward and dq passes, and the dk/dv pass, split a separable bias
    (analysis/separable.py). Not for float32 inputs on a GPU: the parts, up to a tile's
    width of bias each, cost float32 about ten times its rounding near the diagonal (16-bit
    inputs round far more); under the interpreter they split, so that the tests run it. The
    dk/dv pass splits at head dims up to 64 only: at D=128 its per-step terms spilled
    registers (ALiBi backward on the H200 1.252 ms split against 1.207 whole; at D=64 0.780
    against 0.805)."""
    split = not constants["IEEE"]
    return split, split and constants["HEAD_DIM"] <= 64


_fitted: dict[tuple, Config] = {}


def _fallbacks(config: Config, shrink: str):
    """``config``, then fewer pipeline stages, then a smaller ``shrink`` tile (the tile that
    does not set the grid), for kernels whose shared memory does not fit."""
    size = getattr(config, shrink)
    while True:
        for stages in range(config.num_stages, 0, -1):
            yield Config(**{**config.__dict__, "num_stages": stages, shrink: size})
        if size <= 16:
            return
        size //= 2


def run_fitted(kernel, grid, args, config: Config, shrink: str, key: tuple, device,
               constants: dict):
    """Launch ``kernel``; if the configuration's shared memory does not fit this GPU, the next
    smaller one that does (remembered, so the search happens once per kernel and constants).
    ``key`` names the kernel, configuration and constants (settings' key, the pass, the
    constants that vary per call), cheap to hash: it runs on every launch."""
    if direct.launch(key, device, grid, args):
        return
    from triton.runtime.errors import OutOfResources
    candidates = [_fitted[key]] if key in _fitted else _fallbacks(config, shrink)
    error = None
    for candidate in candidates:
        meta = dict(BLOCK_M=candidate.block_m, BLOCK_N=candidate.block_n, **constants)
        try:
            compiled = kernel[grid](*args, num_warps=candidate.num_warps,
                                    num_stages=candidate.num_stages, **meta)
        except OutOfResources as why:
            error = why
            continue
        _fitted[key] = candidate
        direct.remember(key, device, kernel, compiled, args, meta)
        return
    raise error


def head_dim_padded(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def tma_ready(tensors, head_dim: int, config: Config) -> bool:
    """Whether the kernels may read ``tensors`` ([B, H, S, D]) through tensor descriptors:
    asked for, a Hopper or newer GPU (or the interpreter), and the copy engine's rules
    (``_descriptor_layout``), as the launches decide it: by strides once per call geometry
    (``Prepared``), by alignment each call."""
    return (config.tma and _copy_engine_for(head_dim, tensors[0].device)
            and all(_descriptor_strides(t) for t in tensors) and _aligned(*tensors))


def _copy_engine_for(head_dim: int, device: torch.device) -> bool:
    return head_dim_padded(head_dim) <= 256 and _copy_engine(device, interpreting())


def _descriptor_layout(t) -> bool:
    """The copy engine's rules for a [B, H, S, D] tensor: a 16-byte aligned start for every
    (batch, head), positive 16-byte strides over heads and positions, unit stride along D."""
    return _descriptor_strides(t) and not t.data_ptr() % 16


def _descriptor_strides(t) -> bool:
    """The copy engine's rules that a tensor's strides decide (all but its start's alignment,
    which each call's tensors decide)."""
    size = t.element_size()
    batch_stride, head_stride, row_stride, d_stride = t.stride()
    return (d_stride == 1 and head_stride > 0 and row_stride > 0
            and not (head_stride * size % 16 or row_stride * size % 16)
            and (t.shape[0] == 1 or not batch_stride * size % 16))


@functools.lru_cache(maxsize=None)
def _copy_engine(device: torch.device, interpret: bool) -> bool:
    """Whether this device (or the interpreter) and triton can make tensor descriptors."""
    import triton
    if not hasattr(triton.language, "make_tensor_descriptor") or _allocator_slot() is None:
        return False
    if interpret:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _allocator_slot():
    """Triton's context variable holding its allocator (3.6-3.9), or None if this version
    keeps it elsewhere: then the kernels do without descriptors."""
    import contextvars
    try:
        from triton.runtime import _allocation
    except ImportError:
        return None
    slot = getattr(_allocation, "_allocator", None)
    # Older versions keep a plain object there, with no per-context value to check.
    return slot if isinstance(slot, contextvars.ContextVar) else None


_scratch_buffers: dict[tuple[int, int], torch.Tensor] = {}


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernels make (128 bytes each, two a program), on
    the device the launch runs on. One buffer per device and stream, grown when a launch needs
    more: launches on one stream run in order, so they can share it, and a launch then costs no
    allocation. torch's allocator aligns blocks to 512 bytes, more than the 128 Triton asks.
    A CUDA graph being captured keeps the address it sees: it gets memory of its own."""
    if torch.cuda.is_current_stream_capturing():
        return torch.empty(size, dtype=torch.int8, device="cuda")
    key = (torch.cuda.current_device(), stream)
    buffer = _scratch_buffers.get(key)
    if buffer is None or buffer.numel() < size:
        if len(_scratch_buffers) > 64:
            _scratch_buffers.clear()
        buffer = _scratch_buffers[key] = torch.empty(max(size, 1 << 16), dtype=torch.int8,
                                                     device="cuda")
    return buffer


def _ensure_allocator() -> None:
    """Descriptors made inside a kernel need Triton's allocator; set ours unless the caller
    has set one. It lives in a context variable (a new thread, such as autograd's backward
    worker, starts without it), so check every launch."""
    if type(_allocator_slot().get()).__name__ == "NullAllocator":
        import triton
        triton.set_allocator(_scratch)


def _on_tensors_device(launch):
    """Run ``launch`` with q's GPU current: Triton launches on the current device."""
    @functools.wraps(launch)
    def wrapper(prepared, q, *args, **kwargs):
        if prepared.device is not None and prepared.device != torch.cuda.current_device():
            with torch.cuda.device(q.device):
                return launch(prepared, q, *args, **kwargs)
        return launch(prepared, q, *args, **kwargs)
    return wrapper


@dataclass(frozen=True, eq=False)
class Pass:
    """One kernel's launch for one call geometry: its grid, the arguments between its tensors
    and the spec's own (strides, lengths, scale, parameters), and its launch key and
    constexprs for either value of EXACT_RUNS, the one thing a call's tensors still decide."""
    kernel: object
    grid: tuple
    scalars: tuple
    config: Config
    shrink: str             # the tile that does not set the grid: run_fitted's fallbacks
    keys: tuple             # by EXACT_RUNS: (False, True)
    constants: tuple

    @classmethod
    def of(cls, kernel, grid, scalars, config, shrink, key: tuple, constants: dict) -> "Pass":
        return cls(kernel, grid, scalars, config, shrink, (key + (False,), key + (True,)),
                   tuple(dict(constants, EXACT_RUNS=exact) for exact in (False, True)))

    def run(self, tensors: tuple, spec: tuple, exact: bool, device, tail: tuple = ()) -> None:
        run_fitted(self.kernel, self.grid, (*tensors, *self.scalars, *spec, *tail), self.config,
                   self.shrink, self.keys[exact], device, self.constants[exact])


class Prepared:
    """The launches of one call geometry (q, k and v's shapes and strides, dtype, device, scale
    and parameters), worked out on its first call (ops.Entry keeps them): a training step
    repeats its geometry, and then only allocates, gathers its tensors and launches. Holds no
    tensor but weakly. The backward's passes are worked out on the first backward of each
    gradient layout."""

    def __init__(self, kernels: CompiledSpec, analysis: MaskAnalysis, settings: Settings, q, k,
                 v, scale: float, params: tuple):
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        if analysis.by_query.positive:
            values = dict(zip(kernels.source.params, params), q_len=q_len, kv_len=kv_len)
            check_positive(analysis.by_query, values, analysis.spec)
        self.kernels, self.analysis, self.settings = kernels, analysis, settings
        self.device = settings.device
        self.q_len, self.kv_len = q_len, kv_len
        self.batch, self.heads, self.kv_heads = batch, heads, kv_heads
        self.lse_shape = (batch, heads, q_len)
        self.group = heads // kv_heads
        self.params = params
        self.scale = scale
        # Outputs and gradients are allocated as torch lays them out (contiguous, and like q,
        # k and v): meta tensors give those strides without memory.
        self.out_strides = torch.empty(q.shape, device="meta").stride()
        self.grad_strides = tuple(torch.empty_like(t, device="meta").stride() for t in (q, k, v))
        self.qkv_strides = (*q.stride(), *k.stride(), *v.stride())
        self.tensor_names = tuple(t.name for t in kernels.source.tensors)
        # Which of the user's tensors hold document ids (their runs depend on the values).
        ids = {d.tensor for solved in (analysis.by_query, analysis.by_key)
               for c in solved.conjunctions for d in c.documents}
        self._ids_positions = tuple(i for i, t in enumerate(kernels.source.tensors)
                                    if t.name in ids)
        self._backward: dict[tuple, tuple[Pass, Pass]] = {}
        self._runs = None   # the last run tensors (spec_tensors)

        constants, copy_engine = settings.constants, settings.copy_engine
        config = settings.configs.forward
        short = settings.configs.short_forward is not None and kv_len <= SHORT_KEYS
        if short:
            config = settings.configs.short_forward
        kv_descriptors = _descriptor_strides(k) and _descriptor_strides(v)
        pos_scale = scale > 0

        def forward(config, tma):
            grid, wave = _row_grid(q_len, config.block_m, batch * heads, settings.processors)
            fwd_scalars = (*self.qkv_strides, *self.out_strides, q_len, kv_len, heads,
                           self.group, scale, wave, *params)
            return Pass.of(kernels.module.attention_forward, grid, fwd_scalars, config, "block_n",
                           (settings.key, 0, tma, pos_scale, short),
                           dict(POS_SCALE=pos_scale, TMA=tma, SPLIT_BIAS=settings.split_bias,
                                **constants))
        # Descriptors where k and v's starts are aligned too (each call's tensors say).
        self.forward_descriptors = (forward(config, True)
                                    if copy_engine and config.tma and kv_descriptors else None)
        self.forward_pointers = forward(settings.pointer_forward if config.tma else config,
                                        False)
        dq_config, dkdv_config = settings.configs.dq, settings.configs.dkdv
        # Whether the backward passes may read through descriptors (aligned starts permitting).
        self.dq_may_use_descriptors = copy_engine and dq_config.tma and kv_descriptors
        self.dkdv_may_use_descriptors = (copy_engine and dkdv_config.tma
                                         and _descriptor_strides(q))
        self.rows_pad, self.covered = _padded_rows(q_len, dq_config.block_m,
                                                   dkdv_config.block_m)
        self.aux_shape = (batch * heads, 2, self.rows_pad)
        kind = hopper.mask_kind(analysis)
        self.hopper = (hopper.Forward(kind, q, k, scale)
                       if hopper.serves(kind, q, k, v, scale, settings.forward_chosen) else None)

    def spec_tensors(self, tensors) -> tuple[tuple, bool, bool]:
        """The spec's tensor arguments, each with its strides and sizes: ``tensors`` (the
        user's, in signature order), then the run tensors of sorted lookups. And whether those
        are exact each way. The run tensors depend on the ids' values: ``document_tensors``
        keeps them per ids tensor and version, so that a backward finds its forward's and a
        step its last; the last ones are remembered here too, weakly, with the ids they came
        from (an in-place write to the ids changes their version)."""
        if not self.tensor_names:
            return (), True, True
        args = _with_layouts(tensors)
        if not self._ids_positions:
            return tuple(args), True, True
        ids = [tensors[i] for i in self._ids_positions]
        versions = _versions(ids)
        memo = self._runs
        if memo is not None and memo[1] == versions and all(
                ref() is t for ref, t in zip(memo[0], ids)):
            runs = [ref() for ref in memo[2]]
            # By identity: `None in runs` calls each tensor's ==, which raises and catches a
            # TypeError inside torch: 40 us a tensor on the development machine, and documents'
            # forward took 0.22 ms for 0.06 on the H200.
            if all(t is not None for t in runs):
                return (*args, *_with_layouts(runs)), memo[3], memo[4]
        by_name = dict(zip(self.tensor_names, tensors))
        by_query, exact_q = document_tensors(self.analysis.by_query, by_name, self.q_len,
                                             self.kv_len)
        by_key, exact_k = document_tensors(self.analysis.by_key, by_name, self.q_len,
                                           self.kv_len)
        by_name.update(by_query)
        by_name.update(by_key)
        runs = [by_name[name] for name in self.tensor_names[len(tensors):]]
        if versions is not None:
            self._runs = (tuple(weakref.ref(t) for t in ids), versions,
                          tuple(weakref.ref(t) for t in runs), exact_q, exact_k)
        return (*args, *_with_layouts(runs)), exact_q, exact_k

    def backward_passes(self, grad_out_strides: tuple, dq_tma: bool, dkdv_tma: bool,
                        tensor_grads: bool, has_dlse: bool) -> tuple[Pass, Pass]:
        key = (grad_out_strides, dq_tma, dkdv_tma, tensor_grads, has_dlse)
        found = self._backward.get(key)
        if found is None:
            if len(self._backward) > 16:
                self._backward.clear()
            found = self._backward[key] = self._backward_passes(*key)
        return found

    def _backward_passes(self, grad_out_strides, dq_tma, dkdv_tma, tensor_grads, has_dlse):
        settings, module = self.settings, self.kernels.module
        dq_config, dkdv_config = settings.configs.dq, settings.configs.dkdv
        batch, heads = self.batch, self.heads
        common = (*self.qkv_strides, *grad_out_strides)
        dq_strides, dk_strides, dv_strides = self.grad_strides
        dq_grid, dq_wave = _row_grid(self.q_len, dq_config.block_m, batch * heads,
                                     settings.processors)
        dkdv_grid, dkdv_wave = _row_grid(self.kv_len, dkdv_config.block_n,
                                         batch * self.kv_heads, settings.processors)

        def scalars(wave):
            return (self.q_len, self.kv_len, heads, self.group, self.scale, wave, self.rows_pad,
                    *self.params)
        dq = Pass.of(module.attention_backward_dq, dq_grid,
                     (*common, *self.out_strides, *dq_strides, *scalars(dq_wave)), dq_config,
                     "block_n",
                     (settings.key, 1, dq_tma, tensor_grads, has_dlse),
                     dict(TENSOR_GRADS=tensor_grads, TMA=dq_tma, HAS_DLSE=has_dlse,
                          SPLIT_BIAS=settings.split_bias, **settings.constants))
        dkdv = Pass.of(module.attention_backward_dkdv, dkdv_grid,
                       (*common, *dk_strides, *dv_strides, *scalars(dkdv_wave)), dkdv_config,
                       "block_m",
                       (settings.key, 2, dkdv_tma),
                       dict(TMA=dkdv_tma, SPLIT_BIAS=settings.split_bias_dkdv,
                            **settings.constants))
        return dq, dkdv


def _versions(tensors) -> tuple | None:
    """The tensors' version counters, which in-place writes advance; None if one has none (an
    inference tensor): its values cannot be told unchanged."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple([t._version for t in tensors])


def _with_layouts(tensors) -> list:
    """Each tensor followed by its strides and sizes, as the kernels take a tensor argument."""
    args = []
    for t in tensors:
        args.append(t)
        args.extend(t.stride())
        args.extend(t.shape)
    return args


def _aligned(*tensors) -> bool:
    """Whether every tensor starts on 16 bytes, as the copy engine needs."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
    return True


@_on_tensors_device
def forward(prepared: Prepared, q, k, v, tensors: tuple):
    """(out, lse) for ``tensors``, the spec's tensors in signature order."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(prepared.lse_shape, dtype=torch.float32, device=q.device)
    if prepared.q_len == 0:
        return out, lse
    if prepared.hopper is not None and prepared.hopper(q, k, v, out, lse):
        return out, lse
    spec, exact_q, _ = prepared.spec_tensors(tensors)
    launch = prepared.forward_descriptors
    if launch is not None and _aligned(k, v):
        _ensure_allocator()
    else:
        launch = prepared.forward_pointers
    launch.run((q, k, v, out, lse), spec, exact_q, prepared.device)
    return out, lse


@_on_tensors_device
def backward(prepared: Prepared, q, k, v, out, lse, grad_out, tensors: tuple, grad_lse=None,
             tensor_grads: bool = True):
    """dq, dk, dv and a dict of gradients of the float tensors the score uses (empty unless
    ``tensor_grads``: a table that needs no gradient costs no reduction or atomics)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    source = prepared.kernels.source
    tensor_grads = tensor_grads and bool(source.gradients)
    by_name = dict(zip(prepared.tensor_names, tensors)) if source.gradients else {}
    grads = {name: torch.zeros(by_name[name].shape, dtype=torch.float32, device=q.device)
             for name in source.gradient_tensors if tensor_grads}
    if prepared.q_len == 0 or prepared.kv_len == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, grads
    dq_tma = prepared.dq_may_use_descriptors and _aligned(k, v)
    dkdv_tma = prepared.dkdv_may_use_descriptors and _aligned(q)
    if dkdv_tma and not _descriptor_layout(grad_out):
        # A gradient from .sum() is one value broadcast (stride 0): copy it once so that the
        # dk/dv loop reads it through the copy engine.
        grad_out = grad_out.contiguous()
        dkdv_tma = _descriptor_layout(grad_out)
    if dq_tma or dkdv_tma:
        _ensure_allocator()
    lse = lse.contiguous()
    if out.stride() != prepared.out_strides:   # the forward's, unless torch.compile moved it
        out = out.contiguous()
    # delta and lse2, in one buffer [B * H, 2, rows_pad]: written by the dq pass for the dk/dv
    # pass, which runs after it on the same stream, for whole dq tiles: the dk/dv loop then
    # reads its query tiles without a mask.
    aux = torch.empty(prepared.aux_shape, dtype=torch.float32, device=q.device)
    if prepared.covered < prepared.rows_pad:
        aux[:, 0, prepared.covered:].zero_()
        aux[:, 1, prepared.covered:].fill_(math.inf)
    # d lse / d score = p: a gradient on lse enters dS as a shift of delta.
    has_dlse = grad_lse is not None
    dlse = grad_lse.contiguous() if has_dlse else lse
    spec, exact_q, exact_k = prepared.spec_tensors(tensors)
    grad_args = []
    for name in source.gradient_tensors:
        # Without tensor_grads the kernel never touches these: any fp32 pointer will do.
        g = grads.get(name, lse)
        grad_args.append(g)
        grad_args.extend(g.stride() if name in grads else [0] * by_name[name].dim())
    dq_pass, dkdv_pass = prepared.backward_passes(grad_out.stride(), dq_tma, dkdv_tma,
                                                  tensor_grads, has_dlse)
    dq_pass.run((q, k, v, grad_out, out, lse, dlse, aux, dq), spec, exact_q, prepared.device,
                tuple(grad_args))
    dkdv_pass.run((q, k, v, grad_out, aux, dk, dv), spec, exact_k, prepared.device)
    return dq, dk, dv, grads


def _padded_rows(q_len: int, dq_rows: int, dkdv_rows: int) -> tuple[int, int]:
    """Rows a head of the backward's delta and lse2: whole tiles of both passes. And
    how many of them the dq pass writes (whole dq tiles); the rest the caller fills, which
    only a dk/dv query tile that does not divide the dq tile needs. The dk/dv loop reads
    whole tiles of its query range, which starts on a tile and ends before q_len; a smaller
    tile from the shared-memory fallback (a half, a quarter) reads no further."""
    covered = triton_cdiv(q_len, dq_rows) * dq_rows
    tile = math.lcm(dq_rows, dkdv_rows)
    return triton_cdiv(q_len, tile) * tile, covered


def triton_cdiv(a: int, b: int) -> int:
    return max(1, math.ceil(a / b))
