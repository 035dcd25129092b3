"""Timing one spec (``flexdsl bench``): the Triton kernels on a CUDA GPU, else the CPU path.

On the GPU, ``triton.testing.do_bench`` times with CUDA events after warm-up and reports the
median. On the CPU, calls repeat for about ``budget_s`` seconds (at least ``min_runs`` times)
and the median wall time is reported. FLOP/s count only kept positions:
4·B·H·Sq·Skv·D·density for the forward pass and 3.5 times that for forward and backward, as
the side-by-side benchmarks do.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    dim: int

    def flops(self, density: float) -> float:
        """Forward FLOPs of the kept positions: two matmuls of 2·D per position."""
        return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.dim * density


@dataclass(frozen=True)
class Timing:
    first_call_s: float            # includes compiling the kernels on the GPU
    forward_ms: float
    forward_backward_ms: float | None


def median_ms(fn: Callable[[], object], *, cuda: bool, budget_s: float = 2.0,
              min_runs: int = 3) -> float:
    """The median time of ``fn()`` in milliseconds, warmed up."""
    if cuda:
        import triton
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        begin = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def inputs(shape: Shape, dtype, device, seed: int = 0):
    """Random q, k, v of ``shape`` that require gradients, and an output gradient."""
    import torch
    generator = torch.Generator().manual_seed(seed)

    def make(heads: int, length: int):
        x = torch.randn(shape.batch, heads, length, shape.dim, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    q = make(shape.heads, shape.q_len)
    k, v = make(shape.kv_heads, shape.kv_len), make(shape.kv_heads, shape.kv_len)
    grad = torch.randn(q.shape, generator=generator).to(device=device, dtype=dtype)
    return q, k, v, grad


def time_attention(attention: Callable, q, k, v, grad, *, backward: bool, progress=None,
                   budget_s: float = 2.0) -> Timing:
    """Time ``attention(q, k, v)`` forward, and forward with backward unless told not to."""
    import torch
    cuda = q.is_cuda
    say = progress or (lambda message: None)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            return attention(q, k, v)

    def forward_backward():
        attention(q, k, v).backward(grad)

    say("first call" + (" (compiles the kernels)" if cuda else ""))
    start = time.perf_counter()
    forward_backward() if backward else forward()
    sync()
    first = time.perf_counter() - start
    say("timing the forward pass")
    forward_ms = median_ms(forward, cuda=cuda, budget_s=budget_s)
    both_ms = None
    if backward:
        say("timing forward and backward")
        both_ms = median_ms(forward_backward, cuda=cuda, budget_s=budget_s)
    return Timing(first, forward_ms, both_ms)


__all__ = ["DTYPES", "Shape", "Timing", "inputs", "median_ms", "time_attention"]
