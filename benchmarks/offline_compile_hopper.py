"""Compile the warp-specialised Hopper forward (flexdsl/kernel/hopper_gluon.py) for sm_90
without a GPU: catches compile errors and shows shared memory and spills for each head dim,
dtype and mask. Needs a triton with Gluon's Hopper API (3.6 is what the lent GPUs run).

    python benchmarks/offline_compile_hopper.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from flexdsl.kernel import hopper_gluon  # noqa: E402

INTS = ("q_len", "kv_len", "n_bh", "heads", "group", "head_group")


def compile_one(head_dim: int, element, name: str, causal: bool):
    fn = hopper_gluon.attention_forward
    q_layout = gl.NVMMASharedLayout.get_default_for([64, head_dim], element)
    kv_layout = gl.NVMMASharedLayout.get_default_for([128, head_dim], element)
    sig = {"q_desc": f"tensordesc<{name}[64, {head_dim}],{q_layout!r}>",
           "k_desc": f"tensordesc<{name}[128, {head_dim}],{kv_layout!r}>",
           "v_desc": f"tensordesc<{name}[128, {head_dim}],{kv_layout!r}>",
           "O": f"*{name}", "LSE": "*fp32", "counter": "*i32", "qk_scale": "fp32",
           **{n: "i32" for n in INTS}, "HEAD_DIM": "constexpr", "CAUSAL": "constexpr"}
    constants = {(fn.arg_names.index("HEAD_DIM"),): head_dim,
                 (fn.arg_names.index("CAUSAL"),): causal}
    return triton.compile(GluonASTSource(fn, sig, constexprs=constants),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, num_stages=1))


def spills(ptx: str) -> str:
    """ptxas's register and spill line for the kernel (Triton's own ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "(no ptxas in this triton: spills not shown)"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                                capture_output=True, text=True)
    return " ".join(line.strip() for line in result.stderr.splitlines() if "spill" in line)


def main():
    for head_dim in (128, 64):
        for element, name in ((gl.bfloat16, "bf16"), (gl.float16, "fp16")):
            for causal in (True, False):
                compiled = compile_one(head_dim, element, name, causal)
                print(f"D={head_dim} {name} {'causal' if causal else 'full'}: shared "
                      f"{compiled.metadata.shared} B; {spills(compiled.asm['ptx'])}")


if __name__ == "__main__":
    main()
