"""The lowering's own arithmetic: a rewrite of the score for speed must keep its value."""
import math
from types import SimpleNamespace

import pytest
import torch

import flexdsl
from flexdsl.check import Typer
from flexdsl.lower.expr import Lowering

POSITIONS = {"q": "q_idx", "kv": "kv_idx", "b": "b", "h": "h"}

# A fake of the names the text uses, over float64 tensors: the rewrite is algebra, so the
# two texts agree to float64 rounding.
TL = SimpleNamespace(float32=torch.float64, zeros_like=torch.zeros_like, abs=torch.abs,
                     minimum=torch.minimum, maximum=torch.maximum, exp=torch.exp,
                     exp2=torch.exp2, log=torch.log, log2=torch.log2, sqrt=torch.sqrt,
                     where=torch.where)


@pytest.mark.parametrize("score", [
    "cap * tanh(score / cap)",
    "score * 2 - cap",
    "-score / cap + (kv - q) * cap",
    "score * score / cap",
    "(score + 1.5) * (kv - q)",
    "2 * cap * score / 3.0",
    "exp(score / cap) - score",
    "score + kv * 0.5 + q",
    "cap - (score * cap - 3)",
    "(q - kv) * cap",
    "sigmoid(score) * cap + tanh(score / cap) ** 2",
])
def test_gathered_factors_keep_the_value(score):
    spec = flexdsl.compile(score, options=flexdsl.KernelOptions(backend="torch")).spec
    type_of = Typer(spec.signature).type_of
    tree = spec.spec.score
    plain = Lowering(type_of, POSITIONS, reciprocal=True)
    gathered = Lowering(type_of, POSITIONS, reciprocal=True, raw_score="qk")
    gen = torch.Generator().manual_seed(3)
    qk = torch.randn(7, 9, generator=gen, dtype=torch.float64) * 4
    names = dict(tl=TL, qk=qk, sm_scale=0.37, p_cap=-2.5, _LOG2E=math.log2(math.e),
                 q_idx=torch.arange(7)[:, None], kv_idx=torch.arange(9)[None, :],
                 _tanh=torch.tanh, _sigmoid=torch.sigmoid, _ipow=lambda x, n: x ** n)
    expected = eval(plain.floating(tree), {**names, "score": qk * 0.37}) * names["_LOG2E"]
    actual = eval(gathered.scaled(tree, ("_LOG2E",)), names)
    torch.testing.assert_close(actual + torch.zeros_like(qk), expected + torch.zeros_like(qk),
                               rtol=1e-12, atol=1e-12)
    # Without a raw product the score is the scaled variable ``score``, taken as it is.
    unnamed = eval(plain.scaled(tree, ("_LOG2E",)), {**names, "score": qk * 0.37})
    torch.testing.assert_close(unnamed + torch.zeros_like(qk), expected + torch.zeros_like(qk),
                               rtol=1e-12, atol=1e-12)


def test_soft_capping_costs_two_multiplies_an_element():
    # cap * tanh(score / cap) in base 2: tanh(qk * c1) * c2, c1 and c2 one value a program.
    spec = flexdsl.compile("cap * tanh(score / cap) where q >= kv").spec
    lowering = Lowering(Typer(spec.signature).type_of, POSITIONS, reciprocal=True,
                        raw_score="qk")
    assert lowering.scaled(spec.spec.score, ("_LOG2E",)) == \
        "(_tanh((qk * (sm_scale * (1.0 / p_cap)))) * (_LOG2E * p_cap))"
