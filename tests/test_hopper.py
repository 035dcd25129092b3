"""Which specs and calls the warp-specialised Hopper forward serves (kernel/hopper.py); its
values are checked on the GPU (test_gpu.py)."""
from __future__ import annotations

import pytest
import torch

import flexdsl
from flexdsl.kernel import hopper


@pytest.mark.parametrize("spec, kind", [
    ("where q >= kv", "causal"),
    ("score where kv <= q", "causal"),
    ("where kv < q + 1", "causal"),
    ("where q - kv >= 0 and kv >= 0", "causal"),
    ("score", "full"),
    ("where kv >= 0", "full"),
    ("where kv >= -3 and kv <= q", "causal"),
    ("where q > kv", None),                          # the diagonal masked
    ("where q >= kv and kv >= 1", None),
    ("where q + kv_len - q_len >= kv", None),       # bottom-right causal
    ("score + 1 where q >= kv", None),
    ("score * 2", None),
    ("where 0 <= q - kv < W", None),
    ("where kv < P or q >= kv", None),
    ("where doc[q] == doc[kv] and q >= kv", None),
    ("where q >= kv and q % 2 == 0", None),
])
def test_mask_kind(spec, kind):
    assert hopper.mask_kind(flexdsl.compile(spec).analysis) == kind


def test_serves_only_hopper_gpus_and_16_bit_contiguous_inputs():
    q = torch.randn(1, 2, 16, 64)
    assert not hopper.serves("causal", q, q, q, 0.125, False)       # a CPU tensor
    assert not hopper.serves(None, q, q, q, 0.125, False)


BF16 = torch.bfloat16
GOOD = dict(capability=(9, 0), q_dtype=BF16, k_dtype=BF16, v_dtype=BF16,
            q_shape=(2, 8, 1000, 128), k_shape=(2, 2, 1024, 128), scale=0.088,
            contiguous=True)


@pytest.mark.parametrize("change, serves", [
    ({}, True),
    ({"q_dtype": torch.float16, "k_dtype": torch.float16, "v_dtype": torch.float16}, True),
    ({"q_shape": (2, 8, 1000, 64), "k_shape": (2, 2, 1024, 64)}, True),
    ({"capability": (8, 0)}, False),                  # no warp-group MMA
    ({"capability": (10, 0)}, False),                 # nor on Blackwell
    ({"q_dtype": torch.float32, "k_dtype": torch.float32, "v_dtype": torch.float32}, False),
    ({"v_dtype": torch.float16}, False),
    ({"q_shape": (2, 8, 1000, 96), "k_shape": (2, 2, 1024, 96)}, False),
    ({"scale": 0.0}, False),
    ({"scale": -0.1}, False),
    ({"scale": float("inf")}, False),
    ({"contiguous": False}, False),
    ({"q_shape": (0, 8, 1000, 128), "k_shape": (0, 2, 1024, 128)}, False),   # empty batch
    ({"q_shape": (2, 8, 0, 128)}, False),
    ({"k_shape": (2, 2, 0, 128)}, False),
    ({"k_shape": (2, 2, 1000, 128)}, False),          # a head's last key tile is partial
])
def test_eligible(change, serves):
    assert hopper.eligible(**{**GOOD, **change}) is serves


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FLEXDSL_HOPPER_FORWARD", "0")
    assert not hopper.enabled()
    monkeypatch.setenv("FLEXDSL_HOPPER_FORWARD", "1")
    assert hopper.enabled()
