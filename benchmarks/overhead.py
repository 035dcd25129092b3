"""Host-side cost of one call: tiny inputs, many calls back to back, wall time per call.

    python benchmarks/overhead.py            # flexdsl and compiled FlexAttention, a few specs
    python benchmarks/overhead.py --profile  # where flexdsl's Python time goes (cProfile)

A call whose kernel takes less than this is bound by the host, not the GPU.
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

CASES = {
    "causal": ("where q >= kv", {}),
    "documents": ("where doc[q] == doc[kv] and q >= kv", {"doc": None}),
    "alibi_documents": ("score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]",
                        {"doc": None, "slope": None}),
}


def per_call_us(fn, calls=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    length, heads = 256, 4
    q, k, v = (torch.randn(1, heads, length, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    doc = (torch.arange(length, device="cuda") // 50)
    slope = torch.rand(heads, device="cuda")
    print("| case | flexdsl us/call | flexdsl fwd+bwd us | flex us/call | flex fwd+bwd us |")
    for name, (spec, wants) in CASES.items():
        tensors = {n: {"doc": doc, "slope": slope}[n] for n in wants}
        attn = flexdsl.compile(spec)
        ours = per_call_us(lambda: attn(q, k, v, **tensors))
        qg = q.detach().requires_grad_()
        grad = torch.randn_like(q)
        ours_bwd = per_call_us(lambda: attn(qg, k, v, **tensors).backward(grad))
        mask = (lambda b, h, i, j: (i >= j) & (doc[i] == doc[j])) if "doc" in wants else \
            (lambda b, h, i, j: i >= j)
        score = (lambda s, b, h, i, j: s + slope[h] * (j - i)) if "slope" in wants else None
        block = create_block_mask(mask, 1, 1, length, length, device="cuda")
        theirs = per_call_us(lambda: flex(q, k, v, score_mod=score, block_mask=block))
        theirs_bwd = per_call_us(
            lambda: flex(qg, k, v, score_mod=score, block_mask=block).backward(grad))
        print(f"| {name} | {ours:.0f} | {ours_bwd:.0f} | {theirs:.0f} | {theirs_bwd:.0f} |",
              flush=True)
        if args.profile and name == "causal":
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(300):
                attn(qg, k, v, **tensors).backward(grad)
            torch.cuda.synchronize()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
