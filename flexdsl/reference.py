"""The oracle: dense evaluation of any checked spec, in float64 by default.

It materialises the whole (B, Hq, Sq, Skv) score matrix, so it is for tests and small inputs.
Grouped-query attention repeats k and v across the heads of each group. A row whose every
position is masked (or scored -inf) gives output 0 and log-sum-exp -inf, never NaN.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from . import eager
from .check import CheckedSpec


def attention(spec: CheckedSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: float | None = None, params: Mapping[str, float] | None = None,
              tensors: Mapping[str, torch.Tensor] | None = None,
              dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, Hq, Sq, Dv) and log-sum-exp (B, Hq, Sq), computed in ``dtype``.

    ``dtype=None`` computes in the inputs' own dtype: the "low-precision eager" run of the
    three-way comparison. Inputs are not validated here; ``flexdsl.bind`` does that.
    """
    dtype = dtype or q.dtype
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // kv_heads
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    grid = eager.Grid(eager.positions(batch, heads, q_len, kv_len, q.device),
                      dict(params or {}), dict(tensors or {}), dtype, scores, spec.text)
    return softmax_attention(eager.masked_scores(spec.spec, grid), v)


def softmax_attention(scores: torch.Tensor, v: torch.Tensor):
    """softmax(scores) @ v and the log-sum-exp, with 0 and -inf for rows of nothing but -inf."""
    if scores.shape[-1] == 0:  # no keys at all: every row is empty (amax would refuse)
        out = scores.new_zeros(*scores.shape[:-1], v.shape[-1])
        return out, scores.new_full(scores.shape[:-1], -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = row_max == -math.inf
    row_max = row_max.masked_fill(empty, 0)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights / total.masked_fill(empty, 1), v)
    out = out.masked_fill(empty, 0)
    lse = (row_max + torch.log(total)).squeeze(-1)
    lse = lse.masked_fill(empty.squeeze(-1), -math.inf)
    return out, lse
