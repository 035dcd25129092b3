"""The CPU path: attention one block of queries at a time, with an online softmax.

Memory grows with one block of queries times one block of keys, never with Sq x Skv. Key
blocks come from the tile plan of each query block when one is given: EMPTY blocks are never
touched and FULL blocks skip evaluating the mask. Plain torch ops throughout, so autograd works.
"""
from __future__ import annotations

import math

import torch

from .. import eager
from ..bind import Bound

BLOCK_M = 128
BLOCK_N = 256


def attention(bound: Bound, kv_blocks=None, block_m: int = BLOCK_M, block_n: int = BLOCK_N):
    """Output (B, Hq, Sq, D) in q's dtype and log-sum-exp (B, Hq, Sq) in float32 (or float64).

    ``kv_blocks(q_start, q_stop)`` yields ``(kv_start, kv_stop, masked)`` ranges for a block of
    queries; without it every key block is visited with the mask.
    """
    q, k, v = bound.q, bound.k, bound.v
    spec = bound.spec.spec
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if kv_blocks is None:
        kv_blocks = lambda start, stop: [(0, kv_len, True)]  # noqa: E731
    tensors = {n: t for n, t in bound.tensors.items()}
    outs, lses = [], []
    for q_start in range(0, q_len, block_m):
        q_stop = min(q_start + block_m, q_len)
        # (B, Hkv, G, M, D): every query head of a group meets its shared key head.
        q_block = q[:, :, q_start:q_stop].to(compute)
        q_block = q_block.reshape(batch, kv_heads, group, q_stop - q_start, q.shape[-1])
        row_max = torch.full((batch, heads, q_stop - q_start, 1), -math.inf, dtype=compute,
                             device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, heads, q_stop - q_start, v.shape[-1], dtype=compute,
                          device=q.device)
        for kv_start, kv_stop, masked in kv_blocks(q_start, q_stop):
            for n_start in range(kv_start, kv_stop, block_n):
                n_stop = min(n_start + block_n, kv_stop)
                k_block = k[:, :, n_start:n_stop].to(compute).unsqueeze(2)
                v_block = v[:, :, n_start:n_stop].to(compute).unsqueeze(2)
                scores = torch.matmul(q_block, k_block.transpose(-1, -2)) * bound.scale
                scores = scores.reshape(batch, heads, q_stop - q_start, n_stop - n_start)
                grid = eager.Grid(
                    eager.positions(batch, heads, q_len, kv_len, q.device,
                                    q_start, q_stop, n_start, n_stop),
                    bound.params, tensors, compute, scores, bound.spec.text)
                scores = eager.masked_scores(spec, grid, mask=masked)
                new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
                safe_max = new_max.masked_fill(new_max == -math.inf, 0)
                correction = torch.exp(row_max - safe_max)
                weights = torch.exp(scores - safe_max)
                row_sum = row_sum * correction + weights.sum(dim=-1, keepdim=True)
                weights = weights.reshape(batch, kv_heads, group, q_stop - q_start,
                                          n_stop - n_start)
                update = torch.matmul(weights, v_block).reshape_as(acc)
                acc = acc * correction + update
                row_max = new_max
        empty = row_sum == 0
        outs.append((acc / row_sum.masked_fill(empty, 1)).masked_fill(empty, 0))
        lse = row_max + torch.log(row_sum)
        lses.append(lse.masked_fill(empty, -math.inf).squeeze(-1))
    if not outs:
        out, lse = q.new_zeros(batch, heads, 0, v.shape[-1]), q.new_zeros(batch, heads, 0)
    else:
        out, lse = torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)
    return _tied(out, q, k, v, tensors), _tied(lse, q, k, v, tensors)


def _tied(result, *inputs):
    """``result``, in the autograd graph of the inputs that want a gradient even where no key
    was kept (nothing read them): their gradient is then 0, not an error."""
    if result.requires_grad or not torch.is_grad_enabled():
        return result
    wanting = [t for t in (*inputs[:3], *inputs[3].values()) if t.requires_grad]
    if not wanting:
        return result
    # An empty slice's sum: 0 exactly, where t.sum() * 0 is NaN for a tensor holding inf.
    return result + sum(t.reshape(-1)[:0].sum() for t in wanting).to(result.dtype)
