"""Quickstart: one spec, compiled and run on the CPU, and checked against the float64 oracle.

ALiBi on packed documents: each query sees earlier keys of its own document, with a
per-head linear penalty on distance. Run it with ``python examples/quickstart.py``; it exits
with status 1 if the result strays from the reference.
"""
import sys

import torch

import flexdsl

SPEC = "score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]"
TOLERANCE = 1e-4  # float32 inputs against a float64 reference


def main() -> int:
    attn = flexdsl.compile(SPEC)
    print(f"spec: {attn.spec}")
    for line in attn.spec.signature.describe():
        print(f"  {line}")

    # 2 sequences, 8 query heads sharing 2 key/value heads, 3 documents packed in 700 tokens
    batch, heads, kv_heads, length, dim = 2, 8, 2, 700, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    slope = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([250, 300, 150]))

    out, lse = attn(q, k, v, slope=slope, doc=doc, return_lse=True)
    want, want_lse = attn.reference(q, k, v, slope=slope, doc=doc)
    error = max((out.double() - want).abs().max().item(),
                (lse.double() - want_lse).abs().max().item())
    print(f"out {tuple(out.shape)} {out.dtype}; "
          f"max abs error against the float64 reference: {error:.2e}")

    # a mistake in a spec is a SpecError with a caret, never a traceback from inside
    try:
        flexdsl.compile("score + slope[x] where q >= kv")
    except flexdsl.SpecError as mistake:
        print(f"\na typo, as flexdsl reports it:\n{mistake}")

    if not error <= TOLERANCE:
        print(f"FAILED: error {error:.2e} > {TOLERANCE:.0e}", file=sys.stderr)
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
