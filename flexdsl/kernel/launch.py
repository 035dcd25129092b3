"""Launching the rendered kernels: argument lists, tile configurations, grids."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..analysis.plan import MaskAnalysis, check_positive, document_tensors
from . import direct
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
    """One configuration per kernel: forward, dq (rows are queries), dk/dv (rows are keys)."""
    forward: Config
    dq: Config
    dkdv: Config


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
    # - descriptors (the copy engine) pay in long loops (full forward 0.60 -> 0.56 ms) but
    #   cost each program their setup, which short document loops feel (0.165 -> 0.196);
    # - the dk/dv loop of a non-linear score (soft-capping) keeps one more [64, 64] value
    #   live and runs faster with 32-query steps (backward 1.65 -> 1.50 ms); at D=64 these
    #   steps help every spec but those that divide positions (neighbourhood 0.52 -> 0.69).
    if head_dim <= 64 and wide:
        return Configs(Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(64, 64, 4, 2))
    if head_dim <= 64:
        return Configs(Config(128, 64, 8, 3),
                       Config(64, 64, 4, 2 if traits.banded else 3),
                       Config(64, 64, 4, 2) if traits.divides else Config(32, 64, 4, 2, tma=True))
    if head_dim <= 128 and not wide:
        sparse = traits.banded or traits.documents
        return Configs(
            Config(64, 64, 4, 3) if traits.banded else Config(128, 64, 8, 3,
                                                               tma=not traits.documents),
            Config(64, 64, 4, 2) if sparse else Config(128, 64, 8, 3),
            Config(32 if traits.nonlinear_score else 64, 64, 4, 2, tma=True))
    if head_dim <= 128:
        return Configs(Config(64, 32, 4, 2), Config(64, 32, 4, 2), Config(32, 64, 4, 2))
    return Configs(Config(64, 32, 4, 2), Config(64, 16, 4, 2), Config(16, 64, 4, 2))


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


def run_fitted(kernel, grid, args, config: Config, shrink: str, **constants):
    """Launch ``kernel``; if the configuration's shared memory does not fit this GPU, the next
    smaller one that does (remembered, so the search happens once per kernel and shape)."""
    from triton.runtime.errors import OutOfResources
    key = (id(kernel), config, tuple(constants.items()))
    if direct.launch(key, grid, args):
        return _fitted[key]
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
        direct.remember(key, kernel, compiled, args, meta)
        return candidate
    raise error


def run(kernel, grid, args, num_warps: int = 4, **constants):
    """Launch ``kernel`` as it is (a kernel whose resources always fit)."""
    key = (id(kernel), num_warps, tuple(constants.items()))
    if direct.launch(key, grid, args):
        return
    compiled = kernel[grid](*args, num_warps=num_warps, **constants)
    direct.remember(key, kernel, compiled, args, constants)


def head_dim_padded(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def tma_ready(tensors, head_dim: int, config: Config) -> bool:
    """Whether the kernels may read ``tensors`` ([B, H, S, D]) through tensor descriptors:
    asked for, a Hopper or newer GPU (or the interpreter), and the copy engine's rules: a
    16-byte aligned start for every (batch, head), positive 16-byte strides over heads and
    positions, unit stride along D."""
    if not (config.tma and head_dim_padded(head_dim) <= 256
            and _copy_engine(tensors[0].device, interpreting())):
        return False
    for t in tensors:
        size = t.element_size()
        batch_stride, head_stride, row_stride, d_stride = t.stride()
        if t.data_ptr() % 16 or d_stride != 1 or (t.shape[0] > 1 and batch_stride * size % 16):
            return False
        if any(s <= 0 or s * size % 16 for s in (head_stride, row_stride)):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _copy_engine(device: torch.device, interpret: bool) -> bool:
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


def _scratch(size: int, alignment: int, stream):
    """Global memory for the descriptors the kernels make (128 bytes each, two a program), on
    the device the launch runs on. torch's allocator hands out blocks aligned to 512 bytes,
    more than the 128 Triton asks for."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


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
    def wrapper(kernels, analysis, q, *args, **kwargs):
        if q.is_cuda and q.device.index != torch.cuda.current_device():
            with torch.cuda.device(q.device):
                return launch(kernels, analysis, q, *args, **kwargs)
        return launch(kernels, analysis, q, *args, **kwargs)
    return wrapper


@dataclass
class Call:
    """Everything a launch needs beyond q, k, v: scalars and the spec's tensor arguments."""
    scale: float
    params: dict
    tensors: dict


def spec_arguments(kernels: CompiledSpec, analysis: MaskAnalysis, q, k, call: Call):
    """The spec-specific arguments (parameters, tensors with strides and sizes) and the two
    flags that say whether the sorted-lookup run tensors are exact."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if analysis.by_query.positive:
        values = {"q_len": q_len, "kv_len": kv_len, **call.params}
        check_positive(analysis.by_query, values, analysis.spec)
    tensors, exact_q, exact_k = call.tensors, True, True
    if analysis.has_documents:
        by_query, exact_q = document_tensors(analysis.by_query, call.tensors, q_len, kv_len)
        by_key, exact_k = document_tensors(analysis.by_key, call.tensors, q_len, kv_len)
        tensors = {**call.tensors, **by_query, **by_key}
    args = [call.params[name] for name in kernels.source.params]
    for t in kernels.source.tensors:
        value = tensors[t.name]
        args.append(value)
        args.extend(value.stride())
        args.extend(value.shape)
    return args, int(exact_q), int(exact_k)


def _flags(q):
    interpret = interpreting()
    return dict(DOT_F32=interpret, IEEE=(q.dtype == torch.float32 and not interpret))


@_on_tensors_device
def forward(kernels: CompiledSpec, analysis: MaskAnalysis, q, k, v, call: Call,
            config: Config | None = None):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    config = config or default_configs(head_dim, q.dtype, kernels.traits).forward
    out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out, lse
    args, exact_q, _ = spec_arguments(kernels, analysis, q, k, call)
    grid = (triton_cdiv(q_len, config.block_m), batch * heads)
    tma = tma_ready((k, v), head_dim, config)
    if tma:
        _ensure_allocator()
    run_fitted(kernels.module.attention_forward, grid,
               (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                q_len, kv_len, heads, heads // kv_heads, call.scale, exact_q, *args),
               config, "block_n", D=head_dim, HEAD_DIM=head_dim_padded(head_dim),
               POS_SCALE=call.scale > 0, TMA=tma, **_flags(q))
    return out, lse


@_on_tensors_device
def backward(kernels: CompiledSpec, analysis: MaskAnalysis, q, k, v, out, lse, grad_out,
             call: Call, configs: Configs | None = None, grad_lse=None,
             tensor_grads: bool = True):
    """dq, dk, dv and a dict of gradients of the float tensors the score uses (empty unless
    ``tensor_grads``: a table that needs no gradient costs no reduction or atomics)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    defaults = default_configs(head_dim, q.dtype, kernels.traits)
    dq_config = configs.dq if configs and configs.dq else defaults.dq
    dkdv_config = configs.dkdv if configs and configs.dkdv else defaults.dkdv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    tensor_grads = tensor_grads and bool(kernels.source.gradients)
    grads = {g.tensor: torch.zeros(call.tensors[g.tensor].shape, dtype=torch.float32,
                                   device=q.device)
             for g in kernels.source.gradients if tensor_grads}
    if q_len == 0 or kv_len == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, grads
    dq_tma = tma_ready((k, v), head_dim, dq_config)
    dkdv_tma = tma_ready((q,), head_dim, dkdv_config)
    if dkdv_tma and not tma_ready((grad_out,), head_dim, dkdv_config):
        # A gradient from .sum() is one value broadcast (stride 0): copy it once so that the
        # dk/dv loop reads it through the copy engine.
        grad_out = grad_out.contiguous()
        dkdv_tma = tma_ready((grad_out,), head_dim, dkdv_config)
    if dq_tma or dkdv_tma:
        _ensure_allocator()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    prepare_rows = 16 if interpreting() else 64
    # d lse / d score = p: a gradient on lse enters dS as a shift of delta.
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse
    run(kernels.module.attention_backward_prepare,
        (triton_cdiv(q_len, prepare_rows), batch * heads),
        (out, grad_out, lse, dlse, delta, lse2, *out.stride(), *grad_out.stride(),
         *dlse.stride(), q_len, heads),
        HAS_DLSE=has_dlse, D=head_dim, HEAD_DIM=head_dim_padded(head_dim), BLOCK_M=prepare_rows)
    args, exact_q, exact_k = spec_arguments(kernels, analysis, q, k, call)
    grad_args = []
    for name in dict.fromkeys(g.tensor for g in kernels.source.gradients):
        # Without tensor_grads the kernel never touches these: any fp32 pointer will do.
        g = grads.get(name, lse)
        grad_args.append(g)
        grad_args.extend(g.stride() if name in grads else [0] * call.tensors[name].dim())
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())

    constants = dict(D=head_dim, HEAD_DIM=head_dim_padded(head_dim), **_flags(q))
    # The dq pass reads the lse gradient only to finish per-row table gradients.
    dq_dlse = has_dlse and tensor_grads and kernels.source.row_gradients
    run_fitted(kernels.module.attention_backward_dq,
               (triton_cdiv(q_len, dq_config.block_m), batch * heads),
               (q, k, v, grad_out, lse2, delta, dlse.contiguous() if dq_dlse else lse, dq,
                *common, *dq.stride(),
                q_len, kv_len, heads, heads // kv_heads, call.scale, exact_q, *args, *grad_args),
               dq_config, "block_n", TENSOR_GRADS=tensor_grads, TMA=dq_tma, HAS_DLSE=dq_dlse,
               **constants)
    run_fitted(kernels.module.attention_backward_dkdv,
               (triton_cdiv(kv_len, dkdv_config.block_n), batch * kv_heads),
               (q, k, v, grad_out, lse2, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
                q_len, kv_len, heads, heads // kv_heads, call.scale, exact_k, *args),
               dkdv_config, "block_m", TMA=dkdv_tma, **constants)
    return dq, dk, dv, grads


def triton_cdiv(a: int, b: int) -> int:
    return max(1, math.ceil(a / b))
