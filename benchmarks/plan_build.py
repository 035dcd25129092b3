"""What a tile plan costs: flexdsl's closed-form plan against FlexAttention's create_block_mask.

    python benchmarks/plan_build.py                 # CPU: both, 8k to 128k tokens
    python benchmarks/plan_build.py --device cuda   # the same on a GPU

flexdsl's kernels compute their loop bounds from the spec's formulas, so for affine masks
nothing at all is built before a call. This measures the Python-side plan anyway (per-row
bounds, then per-tile ranges: O(S)), the run tensors of packed documents (O(S)), and
create_block_mask, which evaluates the mask at every position (O(S^2)).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexdsl  # noqa: E402
from flexdsl.analysis import plan as plan_module  # noqa: E402
from flexdsl.analysis.plan import document_tensors, plan  # noqa: E402


def _documents(length, device, count=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=gen)[: count - 1] + 1
    ids = torch.zeros(length, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0).to(device)


CASES = {
    "causal": ("where q >= kv", lambda s, d: {}, lambda p, t: (lambda b, h, q, kv: q >= kv)),
    "sliding_window_1024": ("where 0 <= q - kv < W", lambda s, d: {"W": 1024},
                            lambda p, t: (lambda b, h, q, kv: (q >= kv) & (q - kv < 1024))),
    "prefix_lm": ("where kv < P or q >= kv", lambda s, d: {"P": s // 4},
                  lambda p, t: (lambda b, h, q, kv: (kv < p["P"]) | (q >= kv))),
    "documents_12": ("where doc[q] == doc[kv] and q >= kv",
                     lambda s, d: {"doc": _documents(s, d)},
                     lambda p, t: (lambda b, h, q, kv: (t["doc"][q] == t["doc"][kv]) & (q >= kv))),
}


def timed(fn, repeat, device):
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--flex-max", type=int, default=32768,
                        help="longest length to give create_block_mask (it is O(S^2))")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    device = args.device
    from torch.nn.attention.flex_attention import create_block_mask
    print(f"# plan build, {device}, torch {torch.__version__}")
    print("| case | tokens | flexdsl plan ms | flexdsl kernel-side ms | create_block_mask ms |")
    print("|---|---|---|---|---|")
    for name, (spec, values, mask_mod) in CASES.items():
        attn = flexdsl.compile(spec)
        analysis = attn.analysis
        for length in map(int, args.lengths.split(",")):
            given = values(length, device)
            params = {k: v for k, v in given.items() if not torch.is_tensor(v)}
            tensors = {k: v for k, v in given.items() if torch.is_tensor(v)}

            def build():
                return plan(attn.spec, length, length, params=params, tensors=tensors,
                            analysis=analysis).tile_ranges()

            def kernel_side():
                # What a kernel call needs besides the formulas: only the runs of lookups
                # (computed afresh here: calls with the same ids reuse them).
                plan_module._runs.clear()
                return document_tensors(analysis.by_query, tensors, length, length)

            build()
            ours = timed(build, args.repeat, device)
            side = timed(kernel_side, args.repeat, device) if tensors else 0.0
            theirs = "skipped (O(S^2))"
            if length <= args.flex_max:
                mod = mask_mod(params, tensors)

                def theirs_build():
                    return create_block_mask(mod, 1, 1, length, length, device=device)
                try:
                    theirs_build()
                    theirs = f"{timed(theirs_build, max(3, args.repeat // 4), device):.2f}"
                except torch.OutOfMemoryError:   # it materialises the S x S mask
                    theirs = "out of memory"
                    if device == "cuda":
                        torch.cuda.empty_cache()
            print(f"| {name} | {length} | {ours:.3f} | {side:.3f} | {theirs} |", flush=True)


if __name__ == "__main__":
    main()
