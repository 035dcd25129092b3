"""Launching the rendered kernels: argument lists, tile configurations, grids."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..analysis.plan import MaskAnalysis, check_positive, document_tensors
from .compile import CompiledSpec, interpreting


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch settings for one pass."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_configs(head_dim: int, dtype: torch.dtype) -> tuple[Config, Config]:
    """(forward, backward) configurations; small tiles under the interpreter (tests)."""
    if interpreting():
        return Config(16, 16, 1, 1), Config(16, 16, 1, 1)
    wide = dtype == torch.float32
    if head_dim <= 64:
        forward = Config(128, 64, 4, 3)
        backward = Config(64, 64, 4, 2)
    elif head_dim <= 128:
        forward = Config(128, 64 if not wide else 32, 8, 3)
        backward = Config(64, 64 if not wide else 32, 8, 2)
    else:
        forward = Config(64, 32, 4, 2)
        backward = Config(32, 32, 4, 1)
    return forward, backward


def head_dim_padded(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


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
    values = {"q_len": q_len, "kv_len": kv_len, **call.params}
    check_positive(analysis.by_query, values, analysis.spec)
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


def forward(kernels: CompiledSpec, analysis: MaskAnalysis, q, k, v, call: Call,
            config: Config | None = None):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    config = config or default_configs(head_dim, q.dtype)[0]
    out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    if q_len == 0:
        return out, lse
    args, exact_q, _ = spec_arguments(kernels, analysis, q, k, call)
    grid = (triton_cdiv(q_len, config.block_m), batch * heads)
    kernels.module.attention_forward[grid](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_len, kv_len, heads, heads // kv_heads, call.scale, exact_q, *args,
        D=head_dim, HEAD_DIM=head_dim_padded(head_dim), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
        **_flags(q))
    return out, lse


def backward(kernels: CompiledSpec, analysis: MaskAnalysis, q, k, v, out, lse, grad_out,
             call: Call, config: Config | None = None, grad_lse=None):
    """dq, dk, dv and a dict of gradients of the float tensors the score uses."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    config = config or default_configs(head_dim, q.dtype)[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grads = {g.tensor: torch.zeros(call.tensors[g.tensor].shape, dtype=torch.float32,
                                   device=q.device) for g in kernels.source.gradients}
    if q_len == 0 or kv_len == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, grads
    delta = (out.float() * grad_out.float()).sum(-1)
    if grad_lse is not None:
        # d lse / d score = p: a gradient on lse enters dS as a shift of delta.
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    args, exact_q, exact_k = spec_arguments(kernels, analysis, q, k, call)
    grad_args = []
    for name, g in grads.items():
        grad_args.append(g)
        grad_args.extend(g.stride())
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    flags = dict(D=head_dim, HEAD_DIM=head_dim_padded(head_dim), BLOCK_M=config.block_m,
                 BLOCK_N=config.block_n, num_warps=config.num_warps,
                 num_stages=config.num_stages, **_flags(q))
    kernels.module.attention_backward_dq[(triton_cdiv(q_len, config.block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, *common, *dq.stride(),
        q_len, kv_len, heads, heads // kv_heads, call.scale, exact_q, *args, *grad_args,
        **flags)
    kernels.module.attention_backward_dkdv[(triton_cdiv(kv_len, config.block_n),
                                            batch * kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
        q_len, kv_len, heads, heads // kv_heads, call.scale, exact_k, *args, **flags)
    return dq, dk, dv, grads


def triton_cdiv(a: int, b: int) -> int:
    return max(1, math.ceil(a / b))
