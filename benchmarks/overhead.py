"""Host time of a call: what Python and the launches cost the CPU, apart from the kernels.

    python benchmarks/overhead.py                      # a few of bench.py's cases, B=2 H=16 S=4096
    python benchmarks/overhead.py --cases causal --shape 8x16x1024 --profile

Each figure is host microseconds per call, measured hot: forty calls back to back while the GPU
sleeps in a kernel queued before them, so no call waits for the device; the best of five
rounds. "device" is the step's kernels alone (events around one step queued behind a sleep).
A step whose host time exceeds its device time is bound by the host: bench.py then times the
host, and only a shorter host path makes it faster.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexdsl  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench import CASES  # noqa: E402

DEFAULT_CASES = "causal,neighbourhood_64_r3,alibi_documents_causal,sliding_window_1024"
_SLEEP_CYCLES = 300_000_000   # about 0.15 s of GPU time: longer than forty host calls


def host_us(fn, calls: int = 40, rounds: int = 5) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda._sleep(_SLEEP_CYCLES)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
        torch.cuda.synchronize()
    return best / calls * 1e6


def device_us(fn, rounds: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        torch.cuda._sleep(_SLEEP_CYCLES // 10)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[rounds // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--shape", default="2x16x4096")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile flexdsl's training step on the first case")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    batch, heads, length = map(int, args.shape.split("x"))
    print(f"{torch.cuda.get_device_name()}, B={batch} H={heads} S={length} D={args.dim}, bf16; "
          "host us per call (device us per step)")
    print("| case | flexdsl fwd | flexdsl fwd+bwd | FlexAttention fwd | FlexAttention fwd+bwd |")
    print("|---|---|---|---|---|")
    for index, name in enumerate(args.cases.split(",")):
        case = next(c for c in CASES if c.name == name)
        params = case.params(length)
        gen = torch.Generator().manual_seed(0)
        tensors = case.tensors(batch, heads, length, "cuda", gen) if case.tensors else {}
        if "bias" in tensors:
            tensors["bias"] = tensors["bias"][:, : 2 * length]
        q, k, v = (torch.randn(batch, heads, length, args.dim, device="cuda",
                               dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        attn = flexdsl.compile(case.spec, **params)
        score_mod = case.score_mod(params, tensors) if case.score_mod else None
        mask_mod = case.mask_mod(params, tensors) if case.mask_mod else None
        block_mask = (create_block_mask(mask_mod, 1, 1, length, length, device="cuda")
                      if mask_mod else None)
        calls = {"flexdsl": lambda: attn(q, k, v, **tensors),
                 "flex": lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)}
        cells = []
        for call in calls.values():
            step = lambda call=call: call().backward(grad)  # noqa: E731
            cells.append(f"{host_us(call):.0f}")
            cells.append(f"{host_us(step):.0f} ({device_us(step):.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        if args.profile and index == 0:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                attn(q, k, v, **tensors).backward(grad)
            torch.cuda.synchronize()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
