"""Sweep tile configurations for each kernel of a spec on the GPU; prints the best per pass.

    python benchmarks/tune.py --spec "where q >= kv" --shape 2x16x4096 --dim 128
    python benchmarks/tune.py --case alibi_documents_causal --passes dkdv   # bench.py's inputs
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexdsl  # noqa: E402
from flexdsl.kernel.launch import Config  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench import CASES  # noqa: E402

FORWARD = [Config(m, n, w, s) for m, n, w, s in itertools.product(
    (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (m == 64 and w == 8)]
DQ = [Config(m, n, w, s) for m, n, w, s in itertools.product(
    (64, 128), (32, 64), (4, 8), (2, 3, 4))]
DKDV = [Config(m, n, w, s) for m, n, w, s in itertools.product(
    (16, 32, 64), (64, 128), (4, 8), (2, 3, 4))]


def main():
    import triton
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="where q >= kv")
    parser.add_argument("--case", help="a case of bench.py: its spec, parameters and tensors")
    parser.add_argument("--shape", default="2x16x4096")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--passes", default="forward,dq,dkdv")
    parser.add_argument("-p", "--param", action="append", default=[])
    parser.add_argument("--tma", choices=("0", "1", "both"), default="both",
                        help="sweep with pointer loads (0), tensor descriptors (1) or both")
    parser.add_argument("--configs", default="",
                        help="only these, as m,n,warps,stages[,tma] separated by spaces "
                             "(tma 1: tensor descriptors; 0, the default: pointer loads)")
    args = parser.parse_args()
    params = {k: int(v) for k, v in (p.split("=") for p in args.param)}
    batch, heads, length = map(int, args.shape.split("x"))
    tensors = {}
    if args.case:
        case = next(c for c in CASES if c.name == args.case)
        args.spec, params = case.spec, {**case.params(length), **params}
        if case.tensors:
            tensors = case.tensors(batch, heads, length, "cuda", torch.Generator().manual_seed(0))
    q, k, v = (torch.randn(batch, heads, length, args.dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    only = [Config.parse(c) for c in args.configs.split()]
    for name, configs in (("forward", FORWARD), ("dq", DQ), ("dkdv", DKDV)):
        if name not in args.passes:
            continue
        if not only:
            loads = {"0": (False,), "1": (True,), "both": (False, True)}[args.tma]
            configs = [Config(c.block_m, c.block_n, c.num_warps, c.num_stages, tma=tma)
                       for c in configs for tma in loads]
        configs = only or configs
        results = []
        for config in configs:
            options = flexdsl.KernelOptions(**{name: config})
            attn = flexdsl.compile(args.spec, options=options, **params)
            try:
                if name == "forward":
                    ms = triton.testing.do_bench(lambda: attn(q, k, v, **tensors),
                                                 return_mode="median")
                else:
                    out = attn(q, k, v, **tensors)
                    ms = triton.testing.do_bench(
                        lambda: torch.autograd.grad(out, [q, k, v], grad, retain_graph=True),
                        return_mode="median")
            except Exception as error:  # out of resources: skip the config
                print(f"{name} {config}: {type(error).__name__}", flush=True)
                continue
            results.append((ms, config))
        results.sort(key=lambda r: r[0])
        for ms, config in results if only else results[:4]:
            print(f"{name:8s} {ms:8.3f} ms  {config}", flush=True)


if __name__ == "__main__":
    main()
