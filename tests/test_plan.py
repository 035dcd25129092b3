"""Tile plans against brute force: exact for affine specs, sound for everything else.

Brute force evaluates the mask at every position and classifies each tile; the plan must
agree tile by tile when every condition is affine, and otherwise never call a tile FULL that
drops a position nor EMPTY that keeps one.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexdsl
from flexdsl import ir
from flexdsl.analysis.diagonal import diagonal_terms
from flexdsl.analysis.plan import EMPTY, FULL, brute_force_tiles
from flexdsl.analysis.separable import separable_bias
from flexdsl.check import check

LENGTHS = st.sampled_from([1, 17, 232, 1000]) | st.integers(1, 300)
TILES = st.sampled_from([16, 32, 64, 128])
OPS = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def affine(draw):
    """``a*q + b*kv + c*P + d OP e*W`` with small integer coefficients."""
    a, b = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    terms = [f"{a} * q", f"{b} * kv", f"{draw(st.integers(-1, 1))} * P"]
    if draw(st.booleans()):
        terms.append(draw(st.sampled_from(["q_len", "kv_len", "-q_len", "-kv_len"])))
    left = " + ".join(terms) + f" + {draw(st.integers(-60, 60))}"
    return f"{left} {draw(OPS)} {draw(st.integers(-1, 1))} * W"


def combine(atoms):
    return st.recursive(
        atoms,
        lambda inner: st.one_of(
            st.tuples(inner, inner).map(lambda p: f"({p[0]}) and ({p[1]})"),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}) or ({p[1]})"),
            inner.map(lambda x: f"not ({x})"),
        ),
        max_leaves=4,
    )


def _assert_sound(tile_plan, truth):
    planned = tile_plan.tiles()
    planned, truth = torch.broadcast_tensors(planned, truth)
    assert not ((planned == FULL) & (truth != FULL)).any(), "FULL tile with a masked position"
    assert not ((planned == EMPTY) & (truth != EMPTY)).any(), "EMPTY tile with a kept position"
    # The kernels' ranges: every kept tile inside the hull, full ranges only over FULL tiles.
    ranges = tile_plan.tile_ranges()
    n = tile_plan.block_n
    for i, (lo, hi, full_lo, full_hi) in enumerate(ranges.tolist()):
        for j in range(tile_plan.kv_tiles):
            first, last = j * n, min((j + 1) * n, tile_plan.kv_len) - 1
            if (truth[..., i, j] != EMPTY).any():
                assert lo <= last and hi >= first, f"tile ({i}, {j}) kept but outside the hull"
            if full_lo <= first and last <= full_hi:
                assert (truth[..., i, j] == FULL).all(), f"tile ({i}, {j}) is not full"


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mask=combine(affine()), q_len=LENGTHS, kv_len=LENGTHS, block_m=TILES, block_n=TILES,
       P=st.integers(0, 300), W=st.integers(0, 300))
def test_affine_plans_are_exact(mask, q_len, kv_len, block_m, block_n, P, W):
    attn = flexdsl.compile(f"where {mask}")
    params = {k: v for k, v in {"P": P, "W": W}.items() if k in attn.spec.signature.params}
    tile_plan = attn.plan(q_len, kv_len, block_m=block_m, block_n=block_n, **params)
    assert all(tile_plan.exact), attn.analysis.describe()
    truth = brute_force_tiles(attn.spec, q_len, kv_len, block_m, block_n, params)
    assert torch.equal(tile_plan.tiles(), truth), f"{mask}\n{tile_plan}\n{truth[0, 0]}"
    _assert_sound(tile_plan, truth)


def _documents(length, count, sort, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, count, (length,), generator=gen)
    return ids.sort().values if sort else ids


ANYTHING = st.sampled_from([
    "doc[q] == doc[kv]", "doc[q] != doc[kv]", "(q - kv) % D == 0", "q // C >= kv // C",
    "abs(q - kv) <= W", "min(q, P) >= kv", "start[kv] <= q", "kv < P", "q >= kv",
    "abs(q // C - kv // C) <= 1 and abs(q % C - kv % C) <= 2", "max(q - W, 0) <= kv",
    "q * q >= kv", "doc[q] > 1",
])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mask=combine(ANYTHING), length=LENGTHS, block_m=TILES, block_n=TILES,
       sort=st.booleans(), seed=st.integers(0, 10**6), C=st.integers(1, 40),
       D=st.integers(1, 9), P=st.integers(0, 300), W=st.integers(0, 300))
def test_plans_are_sound_for_everything(mask, length, block_m, block_n, sort, seed, C, D, P, W):
    attn = flexdsl.compile(f"where {mask}")
    names = {"C": C, "D": D, "P": P, "W": W,
             "doc": _documents(length, 5, sort, seed),
             "start": torch.randint(0, length, (length,),
                                    generator=torch.Generator().manual_seed(seed + 1))}
    given_ = {k: v for k, v in names.items()
              if k in attn.spec.signature.params or k in attn.spec.signature.tensors}
    tile_plan = attn.plan(length, length, block_m=block_m, block_n=block_n, **given_)
    params = {k: v for k, v in given_.items() if k in attn.spec.signature.params}
    tensors = {k: v for k, v in given_.items() if k in attn.spec.signature.tensors}
    truth = brute_force_tiles(attn.spec, length, length, block_m, block_n, params, tensors)
    _assert_sound(tile_plan, truth)


@settings(max_examples=100, deadline=None)
@given(length=LENGTHS, count=st.integers(1, 20), block=TILES, seed=st.integers(0, 10**6),
       causal=st.booleans())
def test_sorted_documents_are_exact(length, count, block, seed, causal):
    spec = "where doc[q] == doc[kv]" + (" and q >= kv" if causal else "")
    attn = flexdsl.compile(spec)
    doc = _documents(length, count, True, seed)
    tile_plan = attn.plan(length, length, block_m=block, block_n=block, doc=doc)
    truth = brute_force_tiles(attn.spec, length, length, block, block, {}, {"doc": doc})
    assert torch.equal(tile_plan.tiles(), truth)


def test_text_map_and_density():
    tile_plan = flexdsl.compile("where 0 <= q - kv < W").plan(64, block_m=16, block_n=16,
                                                                  W=20)
    text = str(tile_plan)
    # Rows 32..47 keep keys [13, 47]: the first key tile only partly, the next two too.
    assert text.splitlines()[1:5] == ["+...", "++..", "+++.", ".+++"]
    kept = sum(min(q + 1, 20) for q in range(64))
    assert abs(tile_plan.density() - kept / 64 ** 2) < 1e-12


def test_cpu_path_skips_empty_tiles_and_unmasks_full_ones():
    attn = flexdsl.compile("where 0 <= q - kv < W")
    tile_plan = attn.plan(1000, block_m=128, block_n=256, W=300)
    blocks = tile_plan.kv_blocks(512, 640)
    # Rows 512..639 keep keys [213, 639]; keys [340, 512] are kept by all of them.
    assert blocks == [(213, 340, True), (340, 513, False), (513, 640, True)]


def test_plan_reports_a_non_positive_divisor():
    attn = flexdsl.compile("where q // C >= kv // C")
    try:
        attn.plan(100, C=0)
    except flexdsl.SpecError as error:
        assert "'C' must be positive" in str(error)
    else:
        raise AssertionError("C=0 must be refused")


def test_opposite_bounds_peak_inside_a_tile():
    # kv <= 1 - q and kv <= q - 1 keep (q=1, kv=0) only: the upper bound min(1 - q, q - 1)
    # peaks inside the tile, so the hull cannot come from the combined bound at the ends.
    attn = flexdsl.compile("where kv <= 1 - q and kv <= q - 1")
    tile_plan = attn.plan(17, 3, block_m=16, block_n=16)
    lo, hi, _, _ = tile_plan.tile_ranges()[0].tolist()
    assert lo <= 0 <= hi
    q, k, v = torch.randn(1, 1, 17, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    torch.testing.assert_close(attn(q, k, v).double(), attn.reference(q, k, v)[0])


def test_work_trend_orders_heavy_tiles_first():
    # Kernels start the row tiles with the most columns: the last query tiles of a causal mask,
    # the first key tiles of its transpose; windows and full attention have no preference.
    from flexdsl.analysis.bounds import work_trend
    from flexdsl.analysis.plan import MaskAnalysis
    cases = {"where q >= kv": (1, -1), "where kv >= q": (-1, 1), "where kv < P or q >= kv": (1, -1),
             "where 0 <= q - kv < W": (0, 0), "score": (0, 0),
             "where q // C >= kv // C": (1, -1)}
    for text, (by_query, by_key) in cases.items():
        spec = flexdsl.check(text)
        analysis = MaskAnalysis.of(spec)
        assert work_trend(analysis.by_query, spec) == by_query, text
        assert work_trend(analysis.by_key, spec) == by_key, text


def test_banded_masks_are_windows_that_slide_with_the_row():
    # Their default tiles are narrower: a window's ragged edges waste less in them.
    from flexdsl.analysis.bounds import banded
    from flexdsl.analysis.plan import MaskAnalysis
    cases = {"where 0 <= q - kv < W": True, "where abs(q - kv) <= W and (q - kv) % D == 0": True,
             "where abs(q // X - kv // X) <= R and abs(q % X - kv % X) <= R": True,
             "where q >= kv": False, "where kv < P or q >= kv": False, "score": False,
             "where doc[q] == doc[kv] and q >= kv": False,
             "where abs(q - kv) <= W or kv < 4": False,
             "where kv <= q and kv >= q // 2": False,   # a window that widens
             "where q >= kv and q - kv < W": True}
    for text, expected in cases.items():
        spec = flexdsl.check(text)
        analysis = MaskAnalysis.of(spec)
        assert banded(analysis.by_query, spec) == expected, text
        assert banded(analysis.by_key, spec) == expected, text


@pytest.mark.parametrize("spec, bias", [
    ("score + slope[h] * (kv - q) where q >= kv", "slope[h] * (kv - q)"),
    ("2.0 + score - kv // C", "2.0 - kv // C"),
    ("score + (q * 0.5 - kv) / T[h] - max(q, 7) * S", "(q * 0.5 - kv) / T[h] - max(q, 7) * S"),
])
def test_separable_biases_are_found(spec, bias):
    found = separable_bias(check(spec))
    assert found is not None and ir.unparse(found.bias) == bias


@pytest.mark.parametrize("spec", [
    "where q >= kv",                          # no bias: the plain score's own path
    "score + bias[h, q - kv + kv_len]",       # a lookup of both positions
    "score - 0.1 * abs(q - kv)",              # abs does not split
    "score + (kv - q) // W",                  # nor does a floor of both
    "score + 0.001 * q * kv",                 # a product of both
    "2.0 * score + slope[h] * (kv - q)",      # the score scaled
    "score * slope[h] + kv",                  # the score multiplied by a table
    "cap * tanh(score / cap) + kv",           # the score inside a function
    "score + (1.0 if q > kv else 0.0)",       # a condition on both
    # Separable, but possibly infinite at the anchor the kernels subtract: stay whole.
    "score + pad[b, kv]",                     # a key-padding table of -inf
    "score - 0.5 * bq[q] + bk[kv]",
    "score + log(kv + 1.0)",
    "score + (0.0 if kv < P else -inf)",
])
def test_biases_that_do_not_separate(spec):
    assert separable_bias(check(spec)) is None


@pytest.mark.parametrize("spec, terms", [
    ("score + bias[h, q - kv + kv_len]", ["bias[h, q - kv + kv_len]"]),
    # T5: the bucket table and the bias table read through it, as one term
    ("score + rel_bias[h, bucket[q - kv + kv_len]]", ["rel_bias[h, bucket[q - kv + kv_len]]"]),
    ("score + bias[h, clamp(q - kv, -8, 8) + 8] where q >= kv",
     ["bias[h, clamp(q - kv, -8, 8) + 8]"]),
    ("score + tab[2 * q - 2 * kv + 100] * slope[h]", ["tab[2 * q - 2 * kv + 100] * slope[h]"]),
    ("score + (bias[h, q - kv + kv_len] if q >= kv else 0.0)",
     ["bias[h, q - kv + kv_len] if q >= kv else 0.0"]),
    # the condition reads documents: only the table read qualifies
    ("score + (bias[h, q - kv + kv_len] if doc[q] == doc[kv] else 0.0)",
     ["bias[h, q - kv + kv_len]"]),
    # the score is one value per element: the table beside it qualifies, not the product
    ("score * gain[q - kv + 64] + 0.1 * (q - kv)", ["gain[q - kv + 64]"]),
    ("score + bias[h, q - kv + kv_len] * score", ["bias[h, q - kv + kv_len]"]),
    ("score + tab[(q - kv) // 4 + 100] - tab[(q - kv) // 4 + 100]", ["tab[(q - kv) // 4 + 100]"]),
])
def test_terms_read_along_diagonals(spec, terms):
    assert [ir.unparse(t) for t in diagonal_terms(check(spec))] == terms


@pytest.mark.parametrize("spec", [
    "where q >= kv",
    "score + slope[h] * (kv - q)",            # no table read by position: arithmetic is cheaper
    "score - 0.1 * abs(q - kv)",
    "score + bias[h, q + kv]",                # sums of positions run along anti-diagonals
    "score + tab[q // 4 - kv // 4 + 100]",    # not a function of q - kv
    "score + pad[b, kv]",
])
def test_terms_not_read_along_diagonals(spec):
    assert diagonal_terms(check(spec)) == ()
