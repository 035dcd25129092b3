"""flexdsl side by side with FlexAttention and SDPA (flash, cuDNN), on one GPU, one process.

    python benchmarks/bench.py                    # every case and shape of issue 5
    python benchmarks/bench.py --quick            # B=2 H=16 S=4096 D=128 only
    python benchmarks/bench.py --cases causal,softcap --shapes 2x16x4096 --dims 64

Timing: CUDA events through triton.testing.do_bench, after warm-up, median of the runs.
With --rounds N each system is timed N times, interleaved with the others, and reports the
median of its rounds: steps short enough to be bound by the host swing with its load.
TFLOP/s counts only kept positions: 4*B*H*Sq*Skv*D*density forward, 3.5x that for
forward+backward. FlexAttention runs compiled, with its BlockMask built beforehand (its build
is timed separately). Prints one row per case, then geometric means of flexdsl / FlexAttention.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexdsl  # noqa: E402
from flexdsl import eager  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The cases: a flexdsl spec and the FlexAttention mods a user would write for the same variant.

def _documents(count):
    def make(batch, heads, length, device, gen):
        cuts = torch.randperm(length - 1, generator=gen)[: count - 1] + 1
        ids = torch.zeros(length, dtype=torch.int64)
        ids[cuts] = 1
        return {"doc": ids.cumsum(0).to(device)}
    return make


def _slopes(batch, heads, length, device, gen):
    return {"slope": torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)],
                                  device=device)}


def _slopes_documents(batch, heads, length, device, gen):
    return {**_slopes(batch, heads, length, device, gen),
            **_documents(12)(batch, heads, length, device, gen)}


def _bias(batch, heads, length, device, gen):
    return {"bias": torch.randn(heads, 2 * length, generator=gen).to(device)}


@dataclass
class Case:
    name: str
    spec: str
    params: Callable[[int], dict] = lambda length: {}
    tensors: Callable = None
    score_mod: Callable = None       # (params, tensors) -> FlexAttention score_mod
    mask_mod: Callable = None        # (params, tensors) -> FlexAttention mask_mod
    sdpa: tuple[str, ...] = ()       # SDPA backends that run it: is_causal or nothing
    causal: bool = False
    tags: set = field(default_factory=set)


def _causal_mask(p, t):
    return lambda b, h, q, kv: q >= kv


CASES = [
    Case("full", "score", sdpa=("flash", "cudnn")),
    Case("causal", "where q >= kv", mask_mod=_causal_mask, sdpa=("flash", "cudnn"), causal=True),
    Case("sliding_window_1024", "where 0 <= q - kv < W", lambda s: {"W": 1024},
         mask_mod=lambda p, t: (lambda b, h, q, kv: (q >= kv) & (q - kv < p["W"]))),
    Case("prefix_lm", "where kv < P or q >= kv", lambda s: {"P": s // 4},
         mask_mod=lambda p, t: (lambda b, h, q, kv: (kv < p["P"]) | (q >= kv))),
    Case("documents_12_causal", "where doc[q] == doc[kv] and q >= kv", tensors=_documents(12),
         mask_mod=lambda p, t: (lambda b, h, q, kv: (t["doc"][q] == t["doc"][kv]) & (q >= kv))),
    Case("alibi_causal", "score + slope[h] * (kv - q) where q >= kv", tensors=_slopes,
         score_mod=lambda p, t: (lambda s, b, h, q, kv: s + t["slope"][h] * (kv - q)),
         mask_mod=_causal_mask),
    Case("softcap_30_causal", "cap * tanh(score / cap) where q >= kv", lambda s: {"cap": 30.0},
         score_mod=lambda p, t: (lambda s, b, h, q, kv: p["cap"] * torch.tanh(s / p["cap"])),
         mask_mod=_causal_mask),
    Case("relative_bias", "score + bias[h, q - kv + kv_len]", tensors=_bias,
         score_mod=lambda p, t: (lambda s, b, h, q, kv: s + t["bias"][h, q - kv + t["bias"].shape[1] // 2])),
    Case("dilated_512_4", "where abs(q - kv) <= W and (q - kv) % D == 0",
         lambda s: {"W": 512, "D": 4},
         mask_mod=lambda p, t: (lambda b, h, q, kv: ((q - kv).abs() <= p["W"])
                                & ((q - kv) % p["D"] == 0))),
    Case("neighbourhood_64_r3", "where abs(q // X - kv // X) <= R and abs(q % X - kv % X) <= R",
         lambda s: {"X": 64, "R": 3},
         mask_mod=lambda p, t: (lambda b, h, q, kv: ((q // p["X"] - kv // p["X"]).abs() <= p["R"])
                                & ((q % p["X"] - kv % p["X"]).abs() <= p["R"]))),
    Case("alibi_documents_causal",
         "score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]",
         tensors=_slopes_documents,
         score_mod=lambda p, t: (lambda s, b, h, q, kv: s + t["slope"][h] * (kv - q)),
         mask_mod=lambda p, t: (lambda b, h, q, kv: (q >= kv) & (t["doc"][q] == t["doc"][kv]))),
]


# ----------------------------------------------------------------------------------------------

def bench(fn, warmup=25, rep=100):
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def density(attn, length, params, tensors, device) -> float:
    """The exact fraction of kept positions, evaluated in row chunks on the GPU."""
    mask = attn.spec.spec.mask
    if mask is None:
        return 1.0
    kept = 0
    for start in range(0, length, 2048):
        stop = min(start + 2048, length)
        grid = eager.Grid(eager.positions(1, 1, length, length, device, start, stop),
                          params, tensors, torch.float32, None, "")
        keep = eager.evaluate(mask, grid)
        kept += int(torch.broadcast_to(keep, (1, 1, stop - start, length)).sum().item())
    return kept / (length * length)


def run_case(case: Case, batch, heads, kv_heads, length, dim, flex, results, args):
    device, dtype = "cuda", torch.bfloat16
    from torch.nn.attention.flex_attention import create_block_mask
    gen = torch.Generator().manual_seed(0)
    params = case.params(length)
    tensors = case.tensors(batch, heads, length, device, gen) if case.tensors else {}
    if "bias" in tensors:
        tensors["bias"] = tensors["bias"][:, : 2 * length]
    attn = flexdsl.compile(case.spec, **params)
    q = torch.randn(batch, heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(q)
    dens = density(attn, length, params, tensors, device)
    flops = 4 * batch * heads * length * length * dim * dens
    row = {"case": case.name, "shape": f"{batch}x{heads}x{length}", "dim": dim,
           "gqa": f"{heads}:{kv_heads}", "density": dens}

    def measure(forward):
        def fwd_bwd():
            out = forward()
            out.backward(grad)
        fwd_ms = bench(lambda: forward())
        both_ms = bench(fwd_bwd) if not args.forward_only else float("nan")
        return fwd_ms, both_ms

    flexdsl_call = lambda: attn(q, k, v, **tensors)  # noqa: E731
    systems = {"flexdsl": flexdsl_call}
    score_mod = case.score_mod(params, tensors) if case.score_mod else None
    mask_mod = case.mask_mod(params, tensors) if case.mask_mod else None
    block_mask = None
    if mask_mod is not None:
        create_block_mask(mask_mod, 1, 1, length, length, device=device)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, 1, 1, length, length, device=device)
        torch.cuda.synchronize()
        row["block_mask_ms"] = 1e3 * (time.perf_counter() - start)
    enable_gqa = heads != kv_heads
    systems["flex"] = lambda: flex(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                   enable_gqa=enable_gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for name in case.sdpa:
        def call(backend=backends[name]):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=case.causal, enable_gqa=enable_gqa)
        systems[f"sdpa_{name}"] = call

    # Rounds interleave the systems (flexdsl, flex, sdpa..., flexdsl, ...): a step short
    # enough to be bound by the host is timed in several stretches of the host's load, and
    # each system gets the median of its rounds.
    rounds = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, forward in systems.items():
            if name in row:   # failed in an earlier round
                continue
            try:
                rounds[name].append(measure(forward))
            except RuntimeError as error:
                if not name.startswith("sdpa_"):
                    raise
                row[name] = {"error": str(error)[:80]}
    for name, times in rounds.items():
        if name in row:
            continue
        fwd_ms = statistics.median(t[0] for t in times)
        both_ms = statistics.median(t[1] for t in times)
        row[name] = {"fwd_ms": fwd_ms, "fwd_tflops": flops / fwd_ms / 1e9,
                     "fwdbwd_ms": both_ms, "fwdbwd_tflops": 3.5 * flops / both_ms / 1e9}
        if args.rounds > 1:
            row[name]["rounds"] = times
    if args.profile:
        row["flexdsl_kernels"] = kernel_times(flexdsl_call, grad)
        row["flex_kernels"] = kernel_times(systems["flex"], grad)
        for name in ("flexdsl_kernels", "flex_kernels"):
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row[name].items()),
                  flush=True)
    results.append(row)
    _print_row(row)


def kernel_times(forward, grad, steps: int = 10) -> dict[str, float]:
    """Mean device milliseconds per forward+backward step of each kernel, from the profiler:
    which pass is slow, and how much of a call is launch overhead (wall time minus these)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        forward().backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward().backward(grad)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = event.cuda_time_total
        if device_us > 0:
            totals[event.key[:40]] = device_us / steps / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:8])


def _print_row(row):
    f, x = row["flexdsl"], row["flex"]
    ratio_f = f["fwd_ms"] / x["fwd_ms"]
    ratio_b = f["fwdbwd_ms"] / x["fwdbwd_ms"]
    extra = ""
    for name in ("sdpa_flash", "sdpa_cudnn"):
        if name in row and "fwd_tflops" in row[name]:
            extra += f" | {name} {row[name]['fwd_tflops']:.0f}/{row[name]['fwdbwd_tflops']:.0f}"
    print(f"| {row['case']:<24} | {row['shape']:<10} | {row['dim']:>3} | {row['gqa']:<5} "
          f"| {f['fwd_ms']:8.3f} {f['fwd_tflops']:5.0f} | {f['fwdbwd_ms']:8.3f} "
          f"{f['fwdbwd_tflops']:5.0f} | {x['fwd_ms']:8.3f} {x['fwd_tflops']:5.0f} | "
          f"{x['fwdbwd_ms']:8.3f} {x['fwdbwd_tflops']:5.0f} | {ratio_f:5.2f} | {ratio_b:5.2f} |"
          + extra, flush=True)


def compile_costs(flex):
    """First-call latency and recompilations across 10 calls with new lengths and windows."""
    from torch.nn.attention.flex_attention import create_block_mask
    from flexdsl.kernel import compile as kernel_compile
    out = {}
    device, dtype = "cuda", torch.bfloat16
    spec = "where 0 <= q - kv < W and q >= 0"  # a spec not yet compiled in this process
    sizes = [(4096, 1024), (4096, 512), (3000, 256), (5000, 1000), (2048, 100), (8192, 2048),
             (1234, 64), (4097, 333), (6000, 700), (1024, 1024)]

    def make(length):
        return [torch.randn(1, 16, length, 128, device=device, dtype=dtype) for _ in range(3)]

    torch.cuda.synchronize()
    start = time.perf_counter()
    attn = flexdsl.compile(spec)
    attn(*make(4096), W=1024)
    torch.cuda.synchronize()
    out["flexdsl_first_call_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for length, window in sizes:
        attn(*make(length), W=window)
    torch.cuda.synchronize()
    out["flexdsl_10_new_shapes_s"] = time.perf_counter() - start
    module = next(m.module for key, m in kernel_compile._modules.items()
                  if key[0] == str(attn.spec))
    out["flexdsl_binaries"] = sum(len(c[0]) for c in module.attention_forward.device_caches.values())

    def flex_call(length, window):
        def mask(b, h, q, kv):
            return (q - kv >= 0) & (q - kv < window) & (q >= 0)
        block = create_block_mask(mask, 1, 1, length, length, device=device)
        return flex(*make(length), block_mask=block)

    torch._dynamo.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    flex_call(4096, 1024)
    torch.cuda.synchronize()
    out["flex_first_call_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for length, window in sizes:
        flex_call(length, window)
    torch.cuda.synchronize()
    out["flex_10_new_shapes_s"] = time.perf_counter() - start
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="")
    parser.add_argument("--shapes", default="2x16x4096,1x16x16384")
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--no-extra", action="store_true", help="skip GQA, short and compile rows")
    parser.add_argument("--extra-only", action="store_true", help="only GQA, short and compile rows")
    parser.add_argument("--json", default="")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the systems this many times, interleaved; report medians")
    parser.add_argument("--profile", action="store_true",
                        help="also print each kernel's device time per fwd+bwd step")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.dims = "2x16x4096", "128"
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 1000
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1000
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    wanted = set(filter(None, args.cases.split(",")))
    cases = [c for c in CASES if not wanted or c.name in wanted]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    print("| case | shape | D | gqa | flexdsl fwd ms TF/s | flexdsl fwd+bwd ms TF/s | "
          "flex fwd ms TF/s | flex fwd+bwd ms TF/s | fwd ratio | fwd+bwd ratio |", flush=True)
    results = []
    for shape in ([] if args.extra_only else args.shapes.split(",")):
        batch, heads, length = map(int, shape.split("x"))
        for dim in map(int, args.dims.split(",")):
            for case in cases:
                try:
                    run_case(case, batch, heads, heads, length, dim, flex, results, args)
                except Exception as error:  # one failing case must not lose the others
                    print(f"| {case.name} | {shape} | {dim} | failed: "
                          f"{type(error).__name__}: {str(error)[:120]} |", flush=True)
    if not args.no_extra and not args.quick:
        causal = next(c for c in CASES if c.name == "causal")
        run_case(causal, 2, 16, 4, 4096, 128, flex, results, args)
        run_case(causal, 8, 16, 16, 1024, 128, flex, results, args)
    fwd = [r["flexdsl"]["fwd_ms"] / r["flex"]["fwd_ms"] for r in results]
    both = [r["flexdsl"]["fwdbwd_ms"] / r["flex"]["fwdbwd_ms"] for r in results]
    print(f"geomean flexdsl/flex: forward {statistics.geometric_mean(fwd):.3f}, "
          f"forward+backward {statistics.geometric_mean(both):.3f} over {len(results)} rows")
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": __import__("triton").__version__, "rows": results}
    if not args.no_extra and not args.quick:
        summary["compile"] = compile_costs(flex)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
