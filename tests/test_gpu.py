"""GPU kernels against the float64 reference, by the three-way comparison of STYLE.md.

The kernel's error against float64 must stay within twice the error of the same computation
done in eager PyTorch at the kernel's precision, for the output and every gradient. Run on an
H100 or H200 with ``pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch

import flexdsl
from catalogue import CATALOGUE, DIAGONAL, Case, compiled_step_matches_eager

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [(1, 1), (17, 17), (1000, 1000), (4096, 4096), (1000, 1537)]
FUDGE = 2.0


def _error(got, want):
    return (got.double() - want).abs().max().item()


def _run(attn, q, k, v, tensors, grad, dtype):
    """Output and gradients (q, k, v, float tensors) computed at ``dtype`` (None: kernel)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    tensors = {n: (t.detach().clone().requires_grad_() if t.is_floating_point() else t)
               for n, t in tensors.items()}
    if dtype == "kernel":
        out = attn(q, k, v, **tensors)
    else:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        tensors = {n: (t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t)
                   for n, t in tensors.items()}
        out, _ = attn.reference(q, k, v, dtype=dtype, **tensors)
    learn = [t for t in tensors.values() if t.is_floating_point()]
    grads = torch.autograd.grad(out, [q, k, v, *learn], grad.to(out.dtype))
    return [out, *grads]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_three_way(case: Case, dtype, head_dim):
    _three_way(case, dtype, head_dim)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", DIAGONAL, ids=lambda c: c.name)
def test_three_way_diagonal_terms(case: Case, head_dim):
    # Tables read along the tile's diagonals, at the GPU's tile sizes (analysis/diagonal.py).
    _three_way(case, torch.bfloat16, head_dim)


def _three_way(case: Case, dtype, head_dim):
    attn = flexdsl.compile(case.spec, **case.params)
    gen = torch.Generator().manual_seed(0)
    for q_len, kv_len in LENGTHS:
        _compare(attn, case, 1, 4, 2, q_len, kv_len, head_dim, dtype, gen)


def _compare(attn, case, batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, gen):
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to("cuda", dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to("cuda", dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to("cuda", dtype)
    tensors = case.make_tensors(batch, heads, q_len, kv_len, gen, device="cuda")
    grad = torch.randn(batch, heads, q_len, head_dim, generator=gen).to("cuda")
    gold = _run(attn, q, k, v, tensors, grad, torch.float64)
    eager = _run(attn, q, k, v, tensors, grad, dtype)
    kernel = _run(attn, q, k, v, tensors, grad, "kernel")
    names = ["out", "dq", "dk", "dv", *(n for n, t in tensors.items() if t.is_floating_point())]
    for name, g, e, kk in zip(names, gold, eager, kernel):
        assert not torch.isnan(kk).any(), f"{name} has NaN at {q_len}x{kv_len}"
        eager_error, kernel_error = _error(e, g), _error(kk, g)
        # A tiny floor: at length 1 eager can be exact where the kernel rounds once more.
        bound = FUDGE * eager_error + 1e-3 * max(1.0, g.abs().max().item()) * (
            eager_error == 0)
        assert kernel_error <= bound + 1e-6, (
            f"{name} at {q_len}x{kv_len}: kernel error {kernel_error:.3g} > {FUDGE} x "
            f"eager error {eager_error:.3g}")


@pytest.mark.parametrize("spec", ["where q >= kv", "score"])
def test_more_heads_than_a_grid_axis_holds(spec):
    # Batch x heads past 65535, the most a second grid axis takes (an image cut into many
    # short windows): the programs run on one axis of tiles x heads.
    attn = flexdsl.compile(spec)
    _compare(attn, Case("many_heads", spec), 8200, 8, 4, 20, 20, 64, torch.bfloat16,
             torch.Generator().manual_seed(5))


def test_compiles_once_across_lengths_and_parameters():
    attn = flexdsl.compile("where 0 <= q - kv < W")
    from flexdsl.kernel import compile as kernel_compile
    seen = set()
    for length in (1000, 1537, 2048, 3001, 4096):
        for window in (64, 100, 1000):
            q, k, v = (torch.randn(1, 2, length, 64, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            attn(q, k, v, W=window)
            module = next(m.module for key, m in kernel_compile._modules.items()
                          if key[0] == str(attn.spec))
            kernel = module.attention_forward
            seen.add(_compiled_variants(kernel))
    # Triton's cache may hold more than one entry per binary; what matters is that the
    # count never grows after the first call.
    assert len(seen) == 1, f"the kernel cache grew through {sorted(seen)}"


def _compiled_variants(kernel) -> int:
    """How many binaries Triton holds for a kernel (its cache layout since triton 3.2)."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def test_torch_compile_fullgraph_matches_eager():
    attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv")
    compiled_step_matches_eager(attn, heads=4, length=300, device="cuda", dtype=torch.bfloat16,
                                tolerance=1e-2)


def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(), reason="needs an H100/H200")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("spec", ["where q >= kv", "score", "where kv < q + 1"])
def test_hopper_forward_against_float64(spec, head_dim):
    # The warp-specialised forward (kernel/hopper.py) serves these specs on Hopper where the
    # keys are whole 128-key tiles: query lengths off its 128-row items, fewer and more keys
    # than queries, grouped heads, one row, and more items than programs; the backward reads
    # its lse.
    from flexdsl.kernel import hopper
    attn = flexdsl.compile(spec)
    gen = torch.Generator().manual_seed(11)
    before = hopper.launches
    for batch, heads, kv_heads, q_len, kv_len in [(2, 4, 2, 333, 384), (1, 4, 1, 1000, 1536),
                                                  (1, 2, 2, 1537, 1024), (3, 2, 1, 1, 128),
                                                  (4, 16, 16, 600, 640)]:
        for dtype in (torch.bfloat16, torch.float16):
            _compare(attn, Case("hopper", spec), batch, heads, kv_heads, q_len, kv_len,
                     head_dim, dtype, gen)
    assert hopper.launches - before == 10, "the Hopper forward did not serve every call"


@pytest.mark.parametrize("length", [200, 256])
def test_non_finite_values_stay_in_their_batch(length):
    # A padded sample's values are its own: its NaN never reaches its neighbours' outputs
    # (the Hopper forward's key tiles stop at a head's end where it serves, 256).
    attn = flexdsl.compile("where q >= kv")
    q, k, v = (torch.randn(2, 2, length, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    k[1], v[1] = float("nan"), float("inf")
    out = attn(q, k, v)
    assert torch.isfinite(out[0]).all()
    want, _ = attn.reference(q[:1].double(), k[:1].double(), v[:1].double())
    assert _error(out[:1], want) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or not _hopper(), reason="needs an H100/H200")
def test_hopper_forward_repeats_exactly():
    # Items are dealt from a counter that each launch's last program resets: a launch that
    # found it not reset would skip items. Launches on a second stream have their own.
    from flexdsl.kernel import hopper
    attn = flexdsl.compile("where q >= kv")
    q, k, v = (torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    first = attn(q, k, v)
    before = hopper.launches
    for _ in range(5):
        assert torch.equal(attn(q, k, v), first)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = attn(q, k, v)
    side.synchronize()
    assert torch.equal(again, first)
    assert hopper.launches - before == 6
    want, _ = attn.reference(q.double(), k.double(), v.double())
    assert _error(first, want) < 2e-2
