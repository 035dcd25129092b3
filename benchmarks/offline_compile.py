"""Compile a spec's kernels for Hopper (sm_90) without a GPU: catches compile errors and shows
registers, spills and shared memory per kernel and tile configuration; with --loops, the
length of each kernel's main loop in machine instructions and what they are.

    python benchmarks/offline_compile.py "where q >= kv" --dim 128 --loops
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flexdsl  # noqa: E402
from flexdsl.kernel import compile as kernel_compile  # noqa: E402
from flexdsl.kernel.launch import Config, default_configs, split_bias  # noqa: E402

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FLOAT32_POINTERS = {"LSE", "AUX", "DLSE"}


def signature(fn, source, dtype: str, constants: dict):
    """Argument types for ``fn``: tensors by name, float scalars, the rest int32."""
    tensors = {f"t_{t.name}": t for t in source.tensors}
    out = {}
    for name in fn.arg_names:
        if name in constants:
            out[name] = "constexpr"
        elif name in POINTERS:
            out[name] = f"*{dtype}"
        elif name in FLOAT32_POINTERS or (name.startswith("g_") and f"t_{name[2:]}" in tensors):
            out[name] = "*fp32"
        elif name in tensors:
            out[name] = "*i64" if tensors[name].dtype == "int" else "*fp32"
        elif name == "sm_scale" or (name.startswith("p_") and source_param_is_float(name)):
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


_FLOAT_PARAMS: set[str] = set()


def source_for(fn, source, dtype: str, constants: dict) -> ASTSource:
    """What Triton's launcher would compile for contiguous [B, H, S, D] inputs: unit strides
    along the head dim become constants, pointers and the other strides are multiples of 16."""
    unit = [a for a in fn.arg_names if a.startswith("s") and a.endswith("d") and len(a) <= 5]
    constants = {**constants, **{a: 1 for a in unit}}
    sig = signature(fn, source, dtype, constants)
    sixteen = [i for i, a in enumerate(fn.arg_names) if a not in constants and (
        sig[a].startswith("*") or (a.startswith("s") and len(a) <= 5 and a not in unit)
        or a == "rows_pad")]
    return ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v
                                          for k, v in constants.items()},
                     attrs={(i,): [["tt.divisibility", 16]] for i in sixteen})


def source_param_is_float(name: str) -> bool:
    return name in _FLOAT_PARAMS


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's output for a cubin (the tool ships with Triton's CUDA backend)."""
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def resource_usage(cubin: bytes) -> tuple[str, str]:
    """Registers and spill bytes."""
    import re
    text = _cuobjdump(cubin, "-res-usage")
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (regs.group(1) if regs else "?", stack.group(1) if stack else "?")


def main_loop(cubin: bytes) -> str:
    """The innermost loop that issues matrix instructions (HGMMA), from the SASS: its length
    and its commonest opcodes. Instructions a tile costs, not time, but a loop that lost a
    third of them (a select that kept a multiply and a subtraction from fusing) ran 11-23%
    faster (RESULTS.md)."""
    import collections
    import re
    sass = _cuobjdump(cubin, "-sass")
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = None
    for address, text in code:
        jump = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if not jump or int(jump.group(1), 16) >= address:
            continue
        body = [t for a, t in code if int(jump.group(1), 16) <= a <= address]
        ops = collections.Counter(t.split()[1 if t.startswith("@") else 0].split(".")[0]
                                  for t in body)
        if ops["HGMMA"] and (best is None or len(body) < len(best[0])):
            best = (body, ops)
    if best is None:
        return "no loop with HGMMA"
    body, ops = best
    shown = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "FMNMX", "ISETP", "F2FP",
             "LDGSTS", "LDL", "STL")
    return f"{len(body)} instructions: " + ", ".join(f"{o} {ops[o]}" for o in shown if ops[o])


def dump(folder: str, stem: str, asm: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for kind in ("ttgir", "ptx"):
        with open(os.path.join(folder, f"{stem}.{kind}"), "w") as f:
            f.write(asm[kind])
    with open(os.path.join(folder, f"{stem}.cubin"), "wb") as f:
        f.write(asm["cubin"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--config", action="append", default=[],
                        help="kernel:block_m,block_n,warps,stages[,tma] (e.g. dkdv:64,128,8,3,1)")
    parser.add_argument("--no-tma", action="store_true",
                        help="pointer loads everywhere (else as each config says)")
    parser.add_argument("--loops", action="store_true",
                        help="also the main loop's length in SASS instructions, by opcode")
    parser.add_argument("--dump", default="",
                        help="a folder to write each kernel's ttgir, ptx and cubin into")
    args = parser.parse_args()
    import torch
    attn = flexdsl.compile(args.spec)
    _FLOAT_PARAMS.update(f"p_{n}" for n, p in attn.spec.signature.params.items()
                         if p.dtype == "float")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    fast_tanh = args.dtype != "fp32"
    kernels = kernel_compile.compiled(attn.spec, attn.analysis, attn.derivatives,
                                      fast_tanh=fast_tanh)
    defaults = default_configs(args.dim, torch_dtype, kernels.traits)
    configs = {"attention_forward": [defaults.forward], "attention_backward_dq": [defaults.dq],
               "attention_backward_dkdv": [defaults.dkdv]}
    names = {"forward": "attention_forward", "dq": "attention_backward_dq",
             "dkdv": "attention_backward_dkdv"}
    for text in args.config:
        kernel, numbers = text.split(":")
        configs[names[kernel]].append(Config.parse(numbers))
    head = 1 << (args.dim - 1).bit_length()
    target = GPUTarget("cuda", 90, 32)
    print("| kernel | config | regs | spills | shared KiB |" + (" main loop |" if args.loops
                                                                  else ""))
    for kernel_name, candidates in configs.items():
        fn = getattr(kernels.module, kernel_name)
        for config in candidates:
            constants = dict(D=args.dim, HEAD_DIM=head, BLOCK_M=config.block_m,
                             BLOCK_N=config.block_n, DOT_F32=False, EXACT_RUNS=True,
                             IEEE=args.dtype == "fp32", TMA=config.tma and not args.no_tma)
            if kernel_name == "attention_forward":
                constants["POS_SCALE"] = True
            split, split_dkdv = split_bias(constants)
            constants["SPLIT_BIAS"] = split_dkdv if kernel_name == "attention_backward_dkdv" \
                else split
            if kernel_name == "attention_backward_dq":
                constants["TENSOR_GRADS"] = True
                constants["HAS_DLSE"] = False
            src = source_for(fn, kernels.source, args.dtype, constants)
            compiled = triton.compile(src, target=target, options=dict(
                num_warps=config.num_warps, num_stages=config.num_stages))
            shared = compiled.metadata.shared / 1024
            regs, spills = resource_usage(compiled.asm["cubin"])
            if args.dump:
                dump(args.dump, f"{kernel_name}-{config.block_m}x{config.block_n}"
                     f"w{config.num_warps}s{config.num_stages}", compiled.asm)
            loop = f" {main_loop(compiled.asm['cubin'])} |" if args.loops else ""
            print(f"| {kernel_name} | {config.block_m},{config.block_n},{config.num_warps},"
                  f"{config.num_stages} | {regs} | {spills} | {shared:.0f} |{loop}", flush=True)


if __name__ == "__main__":
    main()
