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
