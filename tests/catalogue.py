"""The catalogue of DESIGN.md as test cases: each spec with parameters and tensor makers.

Lengths are chosen by the tests; makers get (batch, heads, q_len, kv_len, generator, device)
so every test draws fresh inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def documents(count: int):
    """Sorted document ids covering max(q_len, kv_len) positions, ``count`` random lengths."""
    def make(batch, heads, q_len, kv_len, gen, device):
        n = max(q_len, kv_len)
        cuts = torch.randperm(max(n - 1, 1), generator=gen)[: max(count - 1, 0)] + 1
        ids = torch.zeros(n, dtype=torch.int64)
        ids[cuts[cuts < n]] = 1
        return ids.cumsum(0).to(device)
    return make


def alibi_slopes(batch, heads, q_len, kv_len, gen, device):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], device=device)


def bias_table(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(heads, q_len + kv_len, generator=gen).to(device)


@dataclass(frozen=True)
class Case:
    name: str
    spec: str
    params: dict = field(default_factory=dict)
    tensors: dict[str, Callable] = field(default_factory=dict)
    equal_lengths: bool = False   # lookups indexed by q and kv alike need q_len == kv_len here

    def make_tensors(self, batch, heads, q_len, kv_len, gen, device="cpu", dtype=None):
        out = {}
        for name, make in self.tensors.items():
            value = make(batch, heads, q_len, kv_len, gen, device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[name] = value
        return out


CATALOGUE = [
    Case("causal", "where q >= kv"),
    Case("sliding_window", "where 0 <= q - kv < W", {"W": 24}),
    Case("prefix_lm", "where kv < P or q >= kv", {"P": 20}),
    Case("packed_documents", "where doc[q] == doc[kv] and q >= kv",
         tensors={"doc": documents(4)}),
    Case("alibi", "score + slope[h] * (kv - q) where q >= kv", tensors={"slope": alibi_slopes}),
    Case("softcap", "cap * tanh(score / cap) where q >= kv", {"cap": 2.0}),
    Case("relative_bias", "score + bias[h, q - kv + kv_len]", tensors={"bias": bias_table}),
    Case("dilated_window", "where abs(q - kv) <= W and (q - kv) % D == 0", {"W": 30, "D": 3}),
    Case("block_causal", "where q // C >= kv // C", {"C": 12}),
    Case("neighbourhood_2d", "where abs(q // X - kv // X) <= R and abs(q % X - kv % X) <= R",
         {"X": 10, "R": 2}),
    Case("bottom_right_causal", "where q + kv_len - q_len >= kv"),
    Case("alibi_documents", "score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]",
         tensors={"slope": alibi_slopes, "doc": documents(3)}),
]
BY_NAME = {case.name: case for case in CATALOGUE}


def _buckets(batch, heads, q_len, kv_len, gen, device):
    # A bucket per distance (q - kv + kv_len), coarser far away, as T5's: an int table.
    distance = torch.arange(q_len + kv_len) - kv_len
    bucket = distance.sign() * torch.log2(distance.abs() + 1.0).floor() + 8
    return bucket.clamp(0, 16).long().to(device)


def _bucket_bias(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(heads, 17, generator=gen).to(device)


def _clamped_table(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(heads, 17, generator=gen).to(device)


def _log_bucket_bias(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(heads, max(q_len, 2).bit_length(), generator=gen).to(device)


def _gains(batch, heads, q_len, kv_len, gen, device):
    return (torch.rand(q_len + kv_len, generator=gen) + 0.5).to(device)


# Terms read along the tile's diagonals (analysis/diagonal.py): once per difference q - kv of
# a tile, then spread over it by a gather. Rows with nothing kept where kv <= q - 3.
DIAGONAL = [
    Case("t5_buckets", "score + rel_bias[h, bucket[q - kv + kv_len]]",
         tensors={"bucket": _buckets, "rel_bias": _bucket_bias}),
    Case("clamped_distance", "score + bias[h, clamp(q - kv, -8, 8) + 8] where kv <= q - 3",
         tensors={"bias": _clamped_table}),
    Case("scaled_score", "score * gain[q - kv + kv_len] where abs(q - kv) <= W", {"W": 20},
         tensors={"gain": _gains}),
    Case("conditional", "score + (bias[h, q - kv + kv_len] if q >= kv else 0.5)",
         tensors={"bias": bias_table}),
    # Functions of q - kv only because positions are never negative (abs(q) is q): the
    # kernels must evaluate them at real positions.
    Case("absolute_query", "score + bias[h, abs(q) - kv + kv_len]", tensors={"bias": bias_table}),
    Case("condition_on_q", "where ((q - kv) % 3 == 0 if q >= 0 else q == kv)"),
    # kv alone inside a term, and a term whose positions cancel (times the distance: a
    # constant added to a whole row has a zero gradient, which only rounding would test).
    Case("halved_distance", "score + bias[h, floor(q * 0.5 - kv * 0.5) + kv_len]",
         tensors={"bias": bias_table}),
    # Causal relative positions indexed from 0: valid only where the mask keeps a position,
    # so the tile's masked differences read clamped entries that must not leak.
    Case("causal_distance", "score + bias[h, q - kv] where q >= kv",
         tensors={"bias": bias_table}),
    # Log buckets computed in the spec: floor(log2(.)) of a power of two must be exact on
    # both sides (the GPU's float64 log2 is not, alone).
    Case("log_buckets", "score + bias[h, floor(log2(q - kv + 1))] where q >= kv",
         tensors={"bias": _log_bucket_bias}),
    Case("positions_cancel", "score + 0.01 * (q - kv) * bias[h, kv - kv + 1] where q >= kv",
         tensors={"bias": bias_table}),
]


def compiled_step_matches_eager(attn, *, heads: int, length: int, device="cpu",
                                dtype=torch.float32, tolerance=None) -> None:
    """A model step (projection, attention with a learnable slope, loss) under
    ``torch.compile(fullgraph=True)`` gives the eager loss and gradients: flexdsl is a custom
    op the compiler calls without a graph break."""
    torch.manual_seed(0)
    width = heads * 16
    proj = torch.nn.Linear(width, 3 * width, device=device, dtype=dtype)
    slope = torch.rand(heads, device=device, requires_grad=True)

    def step(x):
        q, k, v = proj(x).view(1, -1, 3, heads, 16).permute(2, 0, 3, 1, 4)
        return attn(q, k, v, slope=slope).float().square().mean()

    x = torch.randn(1, length, width, device=device, dtype=dtype)
    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, [proj.weight, slope])
    loss = torch.compile(step, fullgraph=True)(x)
    grads = torch.autograd.grad(loss, [proj.weight, slope])
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        if tolerance is None:
            torch.testing.assert_close(got, want)
        else:
            torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
