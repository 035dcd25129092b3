"""flexdsl.nn.Attention: a module holding a spec, its defaults and its learned tensors."""
from __future__ import annotations

import pytest
import torch

import flexdsl
import flexdsl.nn
from flexdsl.errors import SpecCallError

ALIBI = "score + slope[h] * (kv - q) where doc[q] == doc[kv] and q >= kv"


def qkv(heads=4, length=33, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, length, 8, generator=generator, dtype=dtype)
            for _ in range(3)]


def test_learned_slopes_get_the_reference_gradient():
    q, k, v = qkv()
    doc = torch.tensor([0] * 10 + [1] * 23)
    start = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    module = flexdsl.nn.Attention(ALIBI, slope=torch.nn.Parameter(start.clone()))
    weights = torch.randn(2, 4, 33, 8, dtype=torch.float64)
    (module(q, k, v, doc=doc) * weights).sum().backward()

    slope = start.clone().requires_grad_(True)
    out, _ = flexdsl.compile(ALIBI).reference(q, k, v, slope=slope, doc=doc)
    (out * weights).sum().backward()
    assert module.slope.grad is not None
    torch.testing.assert_close(module.slope.grad, slope.grad, atol=1e-10, rtol=1e-10)


def test_tensors_are_state_and_calls_override_them():
    q, k, v = qkv()
    doc = torch.tensor([0] * 33)
    slope = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    module = flexdsl.nn.Attention(ALIBI, slope=slope)
    assert [n for n, _ in module.named_buffers()] == ["slope"]
    assert list(module.state_dict()) == ["slope"]
    assert module.to(torch.float64).slope.dtype == torch.float64
    other = slope.double() * 3
    expected = flexdsl.compile(ALIBI)(q, k, v, slope=other, doc=doc)
    torch.testing.assert_close(module(q, k, v, slope=other, doc=doc), expected)


def test_scalar_defaults_and_scale():
    q, k, v = qkv()
    module = flexdsl.nn.Attention("where 0 <= q - kv < W", W=5, scale=0.5)
    expected = flexdsl.compile("where 0 <= q - kv < W")(q, k, v, W=5, scale=0.5)
    torch.testing.assert_close(module(q, k, v), expected)
    expected = flexdsl.compile("where 0 <= q - kv < W")(q, k, v, W=2, scale=0.5)
    torch.testing.assert_close(module(q, k, v, W=2), expected)
    assert "where 0 <= q - kv < W" in repr(module)


def test_from_config_builds_model_state_but_not_per_call_data():
    config = {"model": {"attention": {
        "spec": ALIBI,
        "tensors": {"slope": {"kind": "alibi_slopes", "learnable": True},
                    "doc": {"kind": "documents", "count": 3}}}}}
    module = flexdsl.nn.Attention.from_config(config, key="model.attention", heads=4)
    assert [n for n, _ in module.named_parameters()] == ["slope"]
    assert module.slope.tolist() == [0.25, 0.0625, 2 ** -6, 2 ** -8]
    assert not hasattr(module, "doc"), "documents follow the batch: a forward argument"
    q, k, v = qkv()
    doc = torch.tensor([0] * 20 + [1] * 13)
    expected = flexdsl.config.load(config, key="model.attention")(
        q, k, v, slope=module.slope.detach().double(), doc=doc)
    torch.testing.assert_close(module(q, k, v, doc=doc), expected)


def test_from_config_fixed_tables_are_buffers(tmp_path):
    path = tmp_path / "t5.toml"
    path.write_text('spec = "score + rel_bias[h, kv % NB]"\n[params]\nNB = 8\n'
                    '[tensors.rel_bias]\nkind = "normal"\nshape = ["heads", "NB"]\n')
    module = flexdsl.nn.Attention.from_config(path, heads=2, seed=1)
    assert module.rel_bias.shape == (2, 8) and not module.rel_bias.requires_grad
    assert [n for n, _ in module.named_buffers()] == ["rel_bias"]
    with pytest.raises(flexdsl.SpecError, match="needs heads"):
        flexdsl.nn.Attention.from_config(path)


def test_unknown_tensor_and_hidden_attribute():
    with pytest.raises(SpecCallError, match="unknown parameter or tensor 'slopes'"):
        flexdsl.nn.Attention(ALIBI, slopes=torch.ones(4))
    with pytest.raises(SpecCallError, match="would hide an attribute of the module"):
        flexdsl.nn.Attention("score + training[h]", training=torch.ones(4))
