"""Every file of the catalogue (specs/*.toml), through every check that applies to a spec file.

One fixture, ``case``, is parametrised over the files and holds what the checks share: the
file read, the spec compiled with its defaults, and inputs at odd lengths with the file's
example tensors. A new check per spec file is one more ``test_*(case)`` function.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import pytest
import torch

import flexdsl
from flexdsl import cli
from flexdsl.config import SpecFile, example_tensors, read_spec_file

SPECS = sorted((pathlib.Path(__file__).parent.parent / "specs").glob("*.toml"))

# Odd sizes, not multiples of any tile; files whose queries and keys are one sequence get
# equal lengths.
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 3, 1, 16
LENGTHS = (137, 201)
SELF_LENGTHS = (150, 150)


@dataclass
class Case:
    path: pathlib.Path
    spec_file: SpecFile
    attention: flexdsl.Attention
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tensors: dict[str, torch.Tensor]
    q_len: int
    kv_len: int


def make_case(path: pathlib.Path, dtype=torch.float64, seed: int = 0) -> Case:
    spec_file = read_spec_file(str(path))
    q_len, kv_len = SELF_LENGTHS if spec_file.self_attention else LENGTHS
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, q_len, HEAD_DIM, generator=generator, dtype=dtype)
    k = torch.randn(BATCH, KV_HEADS, kv_len, HEAD_DIM, generator=generator, dtype=dtype)
    v = torch.randn(BATCH, KV_HEADS, kv_len, HEAD_DIM, generator=generator, dtype=dtype)
    tensors = example_tensors(spec_file, batch=BATCH, heads=HEADS, q_len=q_len,
                              kv_len=kv_len, seed=seed)
    return Case(path, spec_file, flexdsl.compile(spec_file.spec, **spec_file.params),
                q, k, v, tensors, q_len, kv_len)


@pytest.fixture(scope="module", params=SPECS, ids=lambda p: p.stem)
def case(request) -> Case:
    return make_case(request.param)


def test_the_catalogue_is_complete():
    names = {p.stem for p in SPECS}
    assert len(names) >= 22
    assert {"causal", "sliding_window", "prefix_lm", "packed_documents", "alibi", "softcap",
            "relative_bias", "dilated_window", "block_causal", "neighbourhood_2d",
            "bottom_right_causal"} <= names


def test_flexdsl_check_passes(case, capsys):
    assert cli.main(["check", str(case.path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"spec: {case.attention.spec}\n")


def test_file_is_self_contained(case):
    spec_file, signature = case.spec_file, case.attention.spec.signature
    assert spec_file.name and spec_file.description and spec_file.source
    assert "http" in spec_file.source
    assert set(spec_file.params) == set(signature.params), "every parameter needs a default"
    assert set(spec_file.tensors) == set(signature.tensors), "every tensor needs a recipe"


def test_example_tensors_build(case):
    signature = case.attention.spec.signature
    assert set(case.tensors) == set(signature.tensors)
    for name, tensor in case.tensors.items():
        assert tensor.dim() == signature.tensors[name].rank
        assert tensor.is_floating_point() == (signature.tensors[name].dtype == "float")
    # Binding checks every index range that has a closed form against the tensors' sizes.
    case.attention.bind(case.q, case.k, case.v, **case.tensors)
    again = example_tensors(case.spec_file, batch=BATCH, heads=HEADS, q_len=case.q_len,
                            kv_len=case.kv_len, seed=0)
    assert all(torch.equal(again[n], t) for n, t in case.tensors.items())


def test_mask_is_selective(case):
    """The defaults and example tensors make a mask that keeps some positions and drops some,
    so the other checks compare something."""
    spec = case.attention.spec.spec
    if spec.mask is None:
        pytest.skip("no mask")
    from flexdsl import eager
    bound = case.attention.bind(case.q, case.k, case.v, **case.tensors)
    grid = eager.Grid(eager.positions(BATCH, HEADS, case.q_len, case.kv_len, "cpu"),
                      bound.params, bound.tensors, torch.float64, spec_text=bound.spec.text)
    kept = eager.evaluate(spec.mask, grid).float().mean().item()
    assert 0.0 < kept < 1.0


def test_reference_matches_cpu_path(case):
    out, lse = case.attention(case.q, case.k, case.v, return_lse=True, **case.tensors)
    ref_out, ref_lse = case.attention.reference(case.q, case.k, case.v, **case.tensors)
    assert out.dtype == torch.float64
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_tile_plan_is_sound(case):
    """The plan never calls a tile FULL that drops a position, nor EMPTY that keeps one."""
    from flexdsl.analysis.plan import EMPTY, FULL, brute_force_tiles
    params = case.attention.defaults
    tile_plan = case.attention.plan(case.q_len, case.kv_len, block_m=32, block_n=16,
                                    batch=BATCH, heads=HEADS, **case.tensors)
    truth = brute_force_tiles(case.attention.spec, case.q_len, case.kv_len, 32, 16,
                              {n: v for n, v in params.items()
                               if n in case.attention.spec.signature.params},
                              case.tensors, batch=BATCH, heads=HEADS)
    planned, truth = torch.broadcast_tensors(tile_plan.tiles(), truth)
    assert not ((planned == FULL) & (truth != FULL)).any()
    assert not ((planned == EMPTY) & (truth != EMPTY)).any()


def test_kernels_match_the_reference(case):
    """The Triton kernels (the interpreter on a CPU), forward and backward, in float32."""
    from flexdsl.kernel import compile as kernel_compile
    if not kernel_compile.interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = flexdsl.compile(case.spec_file.spec, options=flexdsl.KernelOptions(
        backend="triton"), **case.spec_file.params)
    # Fewer heads and shorter (still odd) lengths keep the interpreter quick; GQA stays (2:1).
    q_len, kv_len = (45, 45) if case.spec_file.self_attention else (37, 45)
    q = case.q[:1, :2, :q_len].float().to(device).requires_grad_()
    k, v = (t[:1, :1, :kv_len].float().to(device).requires_grad_() for t in (case.k, case.v))
    tensors = {n: (t.float() if t.is_floating_point() else t).to(device)
               for n, t in _example(case, q_len, kv_len).items()}
    out = attention(q, k, v, **tensors)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    t64 = {n: (t.double() if t.is_floating_point() else t) for n, t in tensors.items()}
    ref, _ = attention.reference(q64, k64, v64, **t64)
    rq, rk, rv = torch.autograd.grad(ref, [q64, k64, v64], grad.double())
    for got, want in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / scale, want / scale, atol=1e-4, rtol=0)


def _example(case, q_len, kv_len) -> dict[str, torch.Tensor]:
    """The file's example tensors for one batch, two heads and these lengths."""
    return example_tensors(case.spec_file, batch=1, heads=2, q_len=q_len, kv_len=kv_len, seed=1)
