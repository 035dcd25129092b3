"""flexdsl specs through torch's FlexAttention: ``to_flex`` against flexdsl's reference.

Every spec file runs through one compiled flex_attention on the CPU (forward only there, in
float32), at small odd sizes with grouped-query heads, and must match the float64 reference
to float32 accuracy. Each spec compiles its own kernel (a few seconds each).
"""
from __future__ import annotations

import math
import pathlib
import warnings

import pytest
import torch

import flexdsl
from flexdsl.config import example_tensors, read_spec_file
from flexdsl.errors import SpecCallError
from flexdsl.interop import to_flex

flex_attention_module = pytest.importorskip("torch.nn.attention.flex_attention")
flex_attention = flex_attention_module.flex_attention
create_block_mask = flex_attention_module.create_block_mask

SPECS = sorted((pathlib.Path(__file__).parent.parent / "specs").glob("*.toml"))
HEADS, KV_HEADS, HEAD_DIM = 2, 1, 16
LENGTHS = (97, 130)
SELF_LENGTHS = (100, 100)


@pytest.fixture(scope="module")
def compiled_flex():
    """One compiled flex_attention for the module. Each spec's closures compile their own
    kernel anyway, and dynamo's state is reset before each: with torch 2.13, Inductor's CPU
    flex template emitted C++ that did not compile ('cur_kvSplitSize9' undeclared) for
    t5_buckets.toml right after relative_bias.toml in one process, and not after a reset."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield torch.compile(flex_attention)


def inputs(path: pathlib.Path, seed: int = 0):
    spec_file = read_spec_file(str(path))
    q_len, kv_len = SELF_LENGTHS if spec_file.self_attention else LENGTHS
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, q_len, HEAD_DIM, generator=generator)
    k = torch.randn(1, KV_HEADS, kv_len, HEAD_DIM, generator=generator)
    v = torch.randn(1, KV_HEADS, kv_len, HEAD_DIM, generator=generator)
    tensors = example_tensors(spec_file, heads=HEADS, q_len=q_len, kv_len=kv_len, seed=seed)
    return spec_file, q, k, v, tensors


def flex_mods(spec_file, tensors, q_len, kv_len):
    checked = flexdsl.check(spec_file.spec)
    return to_flex(checked, spec_file.params, tensors, q_len=q_len, kv_len=kv_len)


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_compiled_flex_matches_reference(path, compiled_flex):
    spec_file, q, k, v, tensors = inputs(path)
    q_len, kv_len = q.shape[2], k.shape[2]
    score_mod, mask_mod = flex_mods(spec_file, tensors, q_len, kv_len)
    block_mask = create_block_mask(mask_mod, 1, HEADS, q_len, kv_len, device="cpu")
    torch._dynamo.reset()
    with torch.no_grad():
        out = compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask,
                            enable_gqa=True)
    attention = flexdsl.compile(spec_file.spec, **spec_file.params)
    ref_out, _ = attention.reference(q, k, v, **tensors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["alibi_documents", "flamingo_cross"])
def test_flex_lse_is_natural_log(name):
    """flex's log-sum-exp is natural-log based, and -inf for a row with nothing kept, as
    flexdsl's is (uncompiled flex here: compiled CPU flex cannot return it)."""
    spec_file, q, k, v, tensors = inputs(SPECS[0].with_name(f"{name}.toml"))
    q, k, v = q.double(), k.double(), v.double()
    tensors = {n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}
    q_len, kv_len = q.shape[2], k.shape[2]
    score_mod, mask_mod = flex_mods(spec_file, tensors, q_len, kv_len)
    block_mask = create_block_mask(mask_mod, 1, HEADS, q_len, kv_len, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                  enable_gqa=True,
                                  return_aux=flex_attention_module.AuxRequest(lse=True))
    ref_out, ref_lse = flexdsl.compile(spec_file.spec).reference(q, k, v, **tensors)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(aux.lse, ref_lse, atol=1e-10, rtol=1e-10)
    if name == "flamingo_cross":
        assert (ref_lse == -math.inf).any(), "text before the first image sees nothing"


def test_mods_evaluate_the_spec_pointwise():
    spec = flexdsl.check("score * 2 + bias[h, q - kv + kv_len] if q >= kv else -inf "
                         "where (q - kv) % D == 0 and tanh(kv / 2) > 0.4")
    bias = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9)
    score_mod, mask_mod = to_flex(spec, {"D": 2}, {"bias": bias}, q_len=4, kv_len=5)
    i = torch.tensor
    assert score_mod(i(1.5), i(0), i(1), i(3), i(1)).item() == 3.0 + bias[1, 7].item()
    assert score_mod(i(1.5), i(0), i(1), i(1), i(3)).item() == -math.inf
    assert mask_mod(i(0), i(0), i(3), i(1)).item() is True   # tanh(0.5) > 0.4
    assert mask_mod(i(0), i(0), i(4), i(0)).item() is False  # tanh(0) is not
    assert mask_mod(i(0), i(0), i(4), i(1)).item() is False  # (4 - 1) % 2 != 0


def test_log_buckets_are_exact_in_the_mods(monkeypatch):
    # floor(log2(.)) goes through the same exact rounding as the reference and the kernels:
    # a log2 an ulp low (torch's float64 log2 on CUDA at 8) keeps its bucket.
    exact_log2 = torch.log2
    monkeypatch.setattr(torch, "log2", lambda x: exact_log2(x) * (1 - 2.0 ** -52))
    spec = flexdsl.check("score + bias[floor(log2(q - kv + 1))] where q >= kv")
    score_mod, _ = to_flex(spec, {}, {"bias": torch.arange(6, dtype=torch.float32)})
    i = torch.tensor
    buckets = [score_mod(i(0.0), i(0), i(0), i(q), i(0)).item() for q in range(9)]
    assert buckets == [0, 1, 1, 2, 2, 2, 2, 3, 3]


def test_constant_parts_fold_in_float64():
    spec = flexdsl.check("score + log(MD / NB) / 3 where q - kv < W // 2")
    score_mod, mask_mod = to_flex(spec, {"MD": 10.0, "NB": 3, "W": 9})
    i = torch.tensor
    value = score_mod(i(0.0, dtype=torch.float64), i(0), i(0), i(5), i(1)).item()
    assert value == math.log(10.0 / 3) / 3
    assert mask_mod(i(0), i(0), i(5), i(1)).item() is False  # 4 < 4 is false
    assert mask_mod(i(0), i(0), i(5), i(2)).item() is True


def test_no_score_expression_and_no_mask_are_identities():
    score_mod, mask_mod = to_flex(flexdsl.check("score"))
    i = torch.tensor
    assert score_mod(i(0.25), i(0), i(0), i(0), i(0)).item() == 0.25
    assert mask_mod(i(0), i(0), i(0), i(7)).item() is True


@pytest.mark.parametrize("kwargs, message", [
    ({}, "missing parameter 'W'"),
    ({"params": {"W": 4}}, "missing tensor 'doc'"),
    ({"params": {"W": 4}, "tensors": {"doc": torch.zeros(3, 3, dtype=torch.long)}},
     "'doc' has 2 dimensions"),
    ({"params": {"W": 4}, "tensors": {"doc": torch.zeros(3)}}, "'doc' must hold ints"),
    ({"params": {"W": 4}, "tensors": {"doc": torch.zeros(3, dtype=torch.long)}},
     "pass kv_len="),
    ({"params": {"W": 4, "Wx": 1}}, "unknown parameter or tensor 'Wx'"),
])
def test_bad_arguments_are_spec_call_errors(kwargs, message):
    spec = flexdsl.check("where doc[q] == doc[kv] and q - kv < W and kv < kv_len - 1")
    with pytest.raises(SpecCallError, match=message):
        to_flex(spec, **kwargs)
