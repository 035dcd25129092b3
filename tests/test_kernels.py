"""The Triton kernels, run under the interpreter on the CPU, against the float64 reference.

Every catalogue spec, forward and backward, fp32 and fp16, at lengths that are not multiples
of the 16-wide tiles, with Sq != Skv, grouped-query attention and rows with nothing kept.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

import flexdsl
from flexdsl.bind import EvaluatedChecks
from flexdsl.kernel import compile as kernel_compile
from flexdsl.kernel.launch import Config, tma_ready
from flexdsl.lower import render

from catalogue import (BY_NAME, CATALOGUE, DIAGONAL, Case, alibi_slopes, bias_table,
                       compiled_step_matches_eager)

pytestmark = pytest.mark.skipif(not kernel_compile.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU")
TRITON = flexdsl.KernelOptions(backend="triton")
# fp32 under the interpreter is exact fp32; fp16 inputs round q, k, v and P to 11 bits.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3}


def _inputs(case: Case, batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    tensors = case.make_tensors(batch, heads, q_len, kv_len, gen, dtype=torch.float32)
    return q, k, v, tensors


def _check(case: Case, q_len, kv_len, dtype, *, heads=4, kv_heads=2, dim=16, batch=2,
           seed=0, backward=True, options=TRITON, learn_tensors=True):
    if case.equal_lengths and q_len != kv_len:
        pytest.skip("this spec's lookups need equal lengths")
    attn = flexdsl.compile(case.spec, options=options, **case.params)
    q, k, v, tensors = _inputs(case, batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed)
    learn = {n: t.requires_grad_() for n, t in tensors.items()
             if t.is_floating_point() and learn_tensors}
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = attn(q, k, v, return_lse=True, **tensors)
    assert out.dtype == dtype and out.shape == q.shape

    # The oracle, in float64, on the same (rounded) inputs.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    t64 = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t)
           for n, t in tensors.items()}
    ref_out, ref_lse = attn.reference(q64, k64, v64, **t64)
    tol = TOLERANCE[dtype]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "masked rows must give lse = -inf"
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=0)
    if not backward:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    inputs = [q, k, v, *learn.values()]
    grads = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [q64, k64, v64, *(t64[n] for n in learn)]
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad.double())
    names = ["dq", "dk", "dv", *(f"d{n}" for n in learn)]
    for name, got, want in zip(names, grads, ref_grads):
        scale = max(1.0, want.abs().max().item())
        assert not torch.isnan(got).any(), name
        torch.testing.assert_close(got.double() / scale, want / scale, atol=4 * tol, rtol=0,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_catalogue_fp32(case):
    _check(case, 37, 45, torch.float32)


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_catalogue_fp16_square(case):
    _check(case, 33, 33, torch.float16, seed=3)


@pytest.mark.parametrize("q_len, kv_len", [(1, 17), (17, 100), (100, 17)])
@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_lengths(case, q_len, kv_len):
    _check(case, q_len, kv_len, torch.float32, heads=2, kv_heads=1, batch=1,
           seed=q_len * 7 + kv_len)


@pytest.mark.parametrize("q_len, kv_len", [(17, 1), (100, 61)])
@pytest.mark.parametrize("name", ["causal", "prefix_lm", "packed_documents", "softcap"])
def test_more_lengths(name, q_len, kv_len):
    _check(BY_NAME[name], q_len, kv_len, torch.float32, heads=2, kv_heads=1, batch=1,
           seed=q_len * 7 + kv_len)


def _query_table(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(q_len, generator=gen).to(device)


def _key_table(batch, heads, q_len, kv_len, gen, device):
    return torch.randn(heads, kv_len, generator=gen).to(device)


def _head_temperatures(batch, heads, q_len, kv_len, gen, device):
    return (torch.rand(heads, generator=gen) * 20 + 5).to(device)


def _key_padding(batch, heads, q_len, kv_len, gen, device):
    pad = torch.zeros(batch, kv_len)
    pad[0, kv_len // 3:] = -math.inf    # the first sequence's later keys are padding
    pad[1, :2] = -math.inf
    return pad.to(device)


# Biases that split into a query part and a key part (analysis/separable.py): the loops add
# only the key part, the query part goes to lse. Rows with nothing kept where kv_len < q_len.
SEPARABLE = [
    Case("alibi_no_mask", "score + slope[h] * (kv - q)", tensors={"slope": alibi_slopes}),
    Case("divided_by_head_and_clamped",
         "score + (q * 0.5 - kv) / T[h] - max(q, 7) * S where q - 3 <= kv <= q + 20",
         {"S": 0.03}, tensors={"T": _head_temperatures}),
    Case("constant_and_divided", "score + 2.5 + (kv // C) * 0.1 - q * 0.02 where q >= kv",
         {"C": 3}),
]
# Separable too, but a table indexed by a position may hold -inf (a key-padding bias): these
# stay whole, and must give exactly what the reference gives.
WHOLE = [
    Case("key_padding", "score + pad[b, kv] where q >= kv", tensors={"pad": _key_padding}),
    Case("query_and_key_tables",
         "score + 0.5 * bq[q] - bk[h, kv] + 0.01 * (kv - q) where q - 3 <= kv <= q + 20",
         tensors={"bq": _query_table, "bk": _key_table}),
]


@pytest.mark.parametrize("q_len, kv_len", [(37, 45), (17, 100), (45, 20)])
@pytest.mark.parametrize("case", SEPARABLE, ids=lambda c: c.name)
def test_separable_biases(case, q_len, kv_len):
    attn = flexdsl.compile(case.spec, **case.params)
    source = render(attn.spec, attn.analysis, attn.derivatives, fast_tanh=False).text
    assert "s2 = qk * qk_scale + col2" in source
    _check(case, q_len, kv_len, torch.float32, seed=q_len + kv_len)


@pytest.mark.parametrize("case", WHOLE, ids=lambda c: c.name)
def test_biases_that_may_be_infinite_stay_whole(case):
    attn = flexdsl.compile(case.spec, **case.params)
    source = render(attn.spec, attn.analysis, attn.derivatives, fast_tanh=False).text
    assert "col2" not in source
    _check(case, 37, 45, torch.float32, seed=13)


def _gates(batch, heads, q_len, kv_len, gen, device):
    gate = torch.randn(heads, generator=gen)
    gate[1] = -math.inf                  # a head switched off
    return gate.to(device)


def _sequence_bias(batch, heads, q_len, kv_len, gen, device):
    return torch.tensor([0.5, -math.inf]).to(device)


def _temperatures_one_infinite(batch, heads, q_len, kv_len, gen, device):
    temperature = torch.rand(heads, generator=gen) * 20 + 5
    temperature[1] = math.inf
    return temperature.to(device)


def _temperatures_one_zero(batch, heads, q_len, kv_len, gen, device):
    temperature = torch.rand(heads, generator=gen) * 20 + 5
    temperature[1] = 0.0
    return temperature.to(device)


@pytest.mark.parametrize("case", [
    Case("head_gate", "score + gate[h] + 0.01 * (kv - q) where q >= kv", tensors={"gate": _gates}),
    Case("sequence_bias", "score + seq[b] where q >= kv", tensors={"seq": _sequence_bias}),
    # An infinite table value that leaves the bias finite (1 / inf = 0): nothing is empty.
    Case("finite_through_an_infinity",
         "score + (kv - q) * 0.1 / (1.0 + 1.0 / T[h]) where q >= kv",
         tensors={"T": _temperatures_one_infinite}),
    Case("divided_by_an_infinity", "score + (kv - q) / T[h] where q >= kv",
         tensors={"T": _temperatures_one_infinite}),
    # A finite table value that makes the bias infinite (a division by 0): that head is empty.
    Case("divided_by_zero", "score + (kv - q - 0.5) / T[h] where q >= kv",
         tensors={"T": _temperatures_one_zero}),
], ids=lambda c: c.name)
def test_split_biases_infinite_for_a_whole_head_or_sequence(case):
    # A table read by head or batch may hold -inf: every score of those programs is -inf, and
    # their rows must come out empty (output 0, lse -inf), not inf - inf. The dk/dv pass,
    # which changes head from step to step, must agree with the others (GQA: two query heads
    # a key head) whichever way it guards.
    attn = flexdsl.compile(case.spec, **case.params)
    assert "col2" in render(attn.spec, attn.analysis, attn.derivatives, fast_tanh=False).text
    # The gradient of a divisor of 0 is nan, in the reference too: that table learns nothing.
    _check(case, 37, 45, torch.float32, seed=17, learn_tensors=case.name != "divided_by_zero")


def test_separable_bias_whole_where_launch_does_not_split(monkeypatch):
    # Float32 inputs on a GPU keep the whole bias in every pass (launch.split_bias).
    from flexdsl.kernel import launch
    monkeypatch.setattr(launch, "split_bias", lambda constants: (False, False))
    _check(SEPARABLE[1], 37, 45, torch.float32, seed=19,
           options=flexdsl.KernelOptions(backend="triton", dq=Config(16, 16, 1, 1, tma=True)))


def test_steep_alibi_slopes_in_wide_tiles_stay_precise():
    # The split's parts grow with the tile (a slope times half its width): GPU-sized tiles
    # and steep slopes, in float32, within the float32 tolerance.
    steep = Case("steep_alibi", "score + slope[h] * (kv - q) where q >= kv",
                 tensors={"slope": lambda b, h, q, kv, gen, device:
                          torch.tensor([0.7, 0.35, 0.1, 0.02][:h], device=device)})
    wide = flexdsl.KernelOptions(backend="triton", **{
        name: Config(64, 64, 1, 1, tma=True) for name in ("forward", "dq", "dkdv")})
    _check(steep, 300, 300, torch.float32, dim=32, seed=23, options=wide)


def test_division_is_exact_where_compared_or_floored():
    # A score divides by a per-program value through its reciprocal; masks and floors must
    # not: in float32 41 * (1 / 41) < 1.
    for spec, params in [("where kv <= q * kv_len / q_len", {}),
                         ("score + floor(kv / W) * 2.0 where q >= kv", {"W": 41.0})]:
        _check(Case("exact_division", spec, params), 41, 82, torch.float32, seed=29)


def test_separable_bias_unsplit_in_the_dkdv_pass_at_wide_heads():
    # At head dims above 64 the dk/dv pass adds the whole bias (SPLIT_BIAS off), the other
    # two passes still split it.
    _check(SEPARABLE[1], 37, 45, torch.float32, dim=96, seed=8)


def test_separable_bias_in_half_precision_at_long_distances():
    # The key part is taken relative to an anchor near each tile, so it stays as small as the
    # bias itself near the diagonal even far into the sequence.
    _check(BY_NAME["alibi"], 300, 300, torch.float16, heads=2, kv_heads=1, batch=1, seed=5)


@pytest.mark.parametrize("q_len, kv_len", [(37, 45), (17, 100), (45, 20)])
@pytest.mark.parametrize("case", DIAGONAL, ids=lambda c: c.name)
def test_terms_read_along_diagonals(case, q_len, kv_len):
    attn = flexdsl.compile(case.spec, **case.params)
    source = render(attn.spec, attn.analysis, attn.derivatives, fast_tanh=False).text
    assert source.count("win0 = tl.gather(") == 3     # forward, dq and dk/dv
    assert source.count("win0") >= 6                   # ... and each pass reads it
    _check(case, q_len, kv_len, torch.float32, seed=q_len + 2 * kv_len)


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_diagonal_windows_of_oblong_tiles(tiles):
    # The window spans BLOCK_M + BLOCK_N - 1 differences, padded to a power of two.
    m, n = tiles
    options = flexdsl.KernelOptions(backend="triton", forward=Config(m, n, 1, 1, tma=True),
                                    dq=Config(m, n, 1, 1, tma=True),
                                    dkdv=Config(n, m, 1, 1, tma=True))
    _check(BY_NAME["relative_bias"], 70, 53, torch.float32, seed=31, options=options)


class _NaNEmpty(types.ModuleType):
    """torch as launch.py sees it, except that torch.empty and empty_like of floats are NaN:
    memory that no one writes then shows in the result (fresh CPU memory is mostly zeros)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        out = torch.empty(*shape, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    @staticmethod
    def empty_like(*args, **kwargs):
        out = torch.empty_like(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out


@pytest.mark.parametrize("tiles", [(16, 32), (16, 16)])
def test_backward_reads_only_rows_it_wrote(monkeypatch, tiles):
    # The dk/dv loop reads delta and lse2 for whole query tiles without a mask. The dq pass
    # writes whole dq tiles; a dk/dv tile wider than those (32 against 16 here: 48 of 64
    # rows written) needs the rest filled by the launch.
    from flexdsl.kernel import launch
    monkeypatch.setattr(launch, "torch", _NaNEmpty("torch"))
    dq_rows, dkdv_rows = tiles
    options = flexdsl.KernelOptions(backend="triton", dq=Config(dq_rows, 16, 1, 1, tma=True),
                                    dkdv=Config(dkdv_rows, 16, 1, 1, tma=True))
    _check(BY_NAME["alibi_documents"], 37, 45, torch.float32, seed=37, options=options)


@pytest.mark.parametrize("spec", ["score where q >= kv", "score where kv >= q"],
                         ids=["heavy_last", "heavy_first"])
@pytest.mark.parametrize("heads, kv_heads", [(5, 5), (6, 2)])
def test_every_tile_of_every_head_runs_when_heads_are_grouped(monkeypatch, spec, heads,
                                                              kv_heads):
    # Where tiles differ in work, programs take the heads in groups, heavy tiles first
    # (_tile_and_head). Groups of 2 here, whatever the device: 5 heads make groups of 2, 2
    # and 1, the last one short (fresh launches: none prepared by an earlier test). Outputs
    # and gradients start as NaN.
    from flexdsl.kernel import launch, ops
    monkeypatch.setattr(launch, "torch", _NaNEmpty("torch"))
    monkeypatch.setattr(launch, "wave_heads", lambda tiles, heads, processors: min(2, heads))
    monkeypatch.setattr(ops, "registry", {})
    _check(Case("grouped", spec), 37, 45, torch.float32, heads=heads, kv_heads=kv_heads,
           batch=1, seed=41)


def test_head_groups_fill_about_two_programs_a_multiprocessor():
    from flexdsl.kernel.launch import wave_heads
    assert wave_heads(32, 32, 132) == 8       # causal, S=4096, 128-row tiles
    assert wave_heads(128, 16, 132) == 2
    assert wave_heads(16, 128, 132) == 16
    assert wave_heads(1000, 16, 132) == 1
    assert wave_heads(1, 4, 132) == 4         # never more heads than there are
    assert wave_heads(3, 5, 4) == 2           # the interpreter's 4 multiprocessors


def _signed_slopes(batch, heads, q_len, kv_len, gen, device):
    return torch.tensor([0.3, -0.2, 0.05, -0.01][:heads], device=device)


@pytest.mark.parametrize("case", [
    Case("capped_score", "min(score, cap) where q >= kv", {"cap": 0.5}),
    Case("absolute_score", "abs(score) where q >= kv"),
    Case("clamped_table", "score + clamp(bias[h, q - kv + kv_len], -0.5, 0.5)",
         tensors={"bias": bias_table}),
    Case("positive_slopes", "score + max(slope[h], 0.0) * (kv - q) where q >= kv",
         tensors={"slope": _signed_slopes}),
    Case("ceiled_table", "score * ceil(slope[h] * 3.0) where q >= kv",
         tensors={"slope": _signed_slopes}),
    Case("inverse_root", "rsqrt(score * score + 1.0) where q >= kv"),
], ids=lambda c: c.name)
def test_steps_and_roots_differentiate(case):
    # The derivatives of min, max and clamp are steps (sympy's Heaviside), of abs a sign:
    # conditionals taking torch's value at a tie. floor and ceil have none (sympy leaves
    # theirs unevaluated); rsqrt's has a power 3 / 2.
    flat = case.name == "ceiled_table"    # ceil's value is an int: the reference's table
    _check(case, 37, 45, torch.float32, seed=41, learn_tensors=not flat)   # has no gradient
    if flat:
        # flexdsl gives a table used only through steps a gradient of zeros.
        attn = flexdsl.compile(case.spec, options=TRITON)
        q, k, v, tensors = _inputs(case, 1, 4, 2, 37, 45, 16, torch.float32, 43)
        slope = tensors["slope"].requires_grad_()
        out = attn(q, k, v, slope=slope)
        (grad,) = torch.autograd.grad(out, [slope], torch.ones_like(out))
        assert torch.equal(grad, torch.zeros_like(slope))


# The interpreter's default tiles read through tensor descriptors; these take the pointer path.
POINTERS = flexdsl.KernelOptions(backend="triton", **{
    name: Config(16, 16, 1, 1, tma=False) for name in ("forward", "dq", "dkdv")})


@pytest.mark.parametrize("name", ["causal", "packed_documents", "alibi", "softcap"])
def test_pointer_loads(name):
    _check(BY_NAME[name], 37, 45, torch.float32, options=POINTERS, seed=11)


@pytest.mark.parametrize("options", [TRITON, POINTERS], ids=["descriptors", "pointers"])
def test_mask_naming_the_head(options):
    # A mask that names h gives each query head of a group its own query range in the dk/dv
    # pass: the loop over the group's heads stays a loop of its own there.
    case = Case("per_head_window", "where q >= kv and q - kv < 5 + 7 * h")
    _check(case, 37, 45, torch.float32, heads=4, kv_heads=2, options=options, seed=12)


@pytest.mark.skipif(not kernel_compile.interpreting(),
                    reason="CPU tensors reach the copy engine only under the interpreter")
def test_descriptors_only_where_the_copy_engine_can_read():
    config = Config(16, 16, tma=True)
    x = torch.zeros(2, 3, 40, 16)
    assert tma_ready((x,), 16, config)
    assert not tma_ready((x,), 16, Config(16, 16))                    # not asked for
    assert not tma_ready((torch.zeros(2, 3, 40, 15),), 15, config)   # rows of 60 bytes
    assert not tma_ready((x.transpose(2, 3),), 40, config)           # D not contiguous
    assert not tma_ready((x.expand(2, 3, 40, 16).flatten()[1:641].view(1, 1, 40, 16),), 16,
                         config)                                       # start not aligned
    assert not tma_ready((torch.zeros(16).expand(2, 3, 40, 16),), 16, config)  # stride 0
    assert tma_ready((x.transpose(1, 2).contiguous().transpose(1, 2),), 16, config)


def test_default_tiles_follow_the_kind_of_spec():
    # The GPU defaults (benchmarks/tune.py): dense forwards take 128x128 tiles through
    # descriptors, windows and documents narrower forward and dq tiles, a soft-capped score or
    # a division of q - kv 32-query dk/dv steps, at D=64 masks that divide positions keep
    # 64-query steps, and tables read along the diagonals 128x64 forward tiles.
    from flexdsl.kernel.launch import _gpu_configs

    def configs(text, head_dim):
        attn = flexdsl.compile(text)
        traits = kernel_compile.KernelTraits.of(attn.spec, attn.analysis, attn.derivatives)
        return _gpu_configs(head_dim, False, traits)

    causal = configs("where q >= kv", 128)
    assert causal.forward == Config(128, 128, 8, 3, tma=True)
    assert (causal.dq.block_m, causal.dkdv.block_m) == (128, 64)
    window = configs("where 0 <= q - kv < W", 128)
    assert (window.forward.block_m, window.dq.block_m) == (64, 64)
    documents = configs("where doc[q] == doc[kv] and q >= kv", 128)
    assert (documents.forward.block_m, documents.forward.tma, documents.dq.block_m) == \
        (64, False, 64)
    assert configs("cap * tanh(score / cap) where q >= kv", 128).dkdv.block_m == 32
    neighbourhood = "where abs(q // X - kv // X) <= R and abs(q % X - kv % X) <= R"
    dilated = configs("where abs(q - kv) <= W and (q - kv) % D == 0", 128)
    assert (dilated.forward.block_m, dilated.dq.block_m, dilated.dkdv.block_m) == (64, 64, 32)
    assert configs(neighbourhood, 128).dkdv.block_m == 64
    assert configs("where q >= kv", 64).dkdv == Config(32, 64, 4, 2, tma=True)
    assert configs(neighbourhood, 64).dkdv == Config(64, 64, 4, 2)
    assert configs("where 0 <= q - kv < W", 64).forward.block_m == 64
    assert configs("where q >= kv", 64).forward.block_m == 128
    assert configs("score + bias[h, q - kv + kv_len]", 128).forward == Config(128, 64, 8, 3,
                                                                              tma=True)


def test_wide_forward_tiles_narrow_without_descriptors(monkeypatch):
    # 128x128 forward tiles fit in shared memory only through descriptors; where k and v
    # cannot use them the forward takes 128x64 tiles, unless the caller chose the tile.
    from flexdsl.kernel import launch
    attn = flexdsl.compile("where q >= kv")
    traits = kernel_compile.KernelTraits.of(attn.spec, attn.analysis, attn.derivatives)
    kernels = kernel_compile.compiled(attn.spec, attn.analysis, attn.derivatives,
                                      fast_tanh=False)
    monkeypatch.setattr(launch, "default_configs",
                        lambda head_dim, dtype, traits: launch._gpu_configs(head_dim, False,
                                                                            traits))
    chosen = launch.settings(kernels, 128, torch.bfloat16, torch.device("cpu"))
    assert chosen.configs.forward == Config(128, 128, 8, 3, tma=True)
    assert chosen.pointer_forward == Config(128, 64, 8, 3)
    asked = Config(128, 128, 8, 2, tma=True)
    overridden = launch.settings(kernels, 128, torch.bfloat16, torch.device("cpu"),
                                 launch.Configs(asked, None, None))
    assert overridden.pointer_forward == asked
    assert traits == kernels.traits


def test_short_key_ranges_take_a_narrower_forward_tile(monkeypatch):
    # Up to SHORT_KEYS keys the GPU forward takes 64x64 tiles where its default is 128 rows
    # wide, under a launch key of its own (a direct launch must not find the wide binary);
    # a tile the caller chose stays.
    from flexdsl.kernel import launch
    attn = flexdsl.compile("where q >= kv")
    kernels = kernel_compile.compiled(attn.spec, attn.analysis, attn.derivatives,
                                      fast_tanh=False)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "default_configs",
                        lambda head_dim, dtype, traits: launch._gpu_configs(head_dim, False,
                                                                            traits))

    def settings(head_dim=128, overrides=None):
        return launch.settings(kernels, head_dim, torch.bfloat16, torch.device("cpu"),
                               overrides)

    def forward(settings, length):
        q = torch.empty(2, 4, length, settings.constants["D"])
        return launch.Prepared(kernels, attn.analysis, settings, q, q, q, 0.1, ()).forward_pointers

    chosen = settings()
    short, wide = forward(chosen, launch.SHORT_KEYS), forward(chosen, launch.SHORT_KEYS + 1)
    assert short.config == Config(64, 64, 4, 3) and short.grid == (16 * 8,)   # tiles x heads
    assert wide.config.block_m == 128
    assert short.keys[0][:-2] == wide.keys[0][:-2] and short.keys[0] != wide.keys[0]
    assert forward(settings(head_dim=64), 1000).config.block_m == 128   # measured at D=128
    asked = Config(128, 64, 8, 2)
    assert forward(settings(overrides=launch.Configs(asked, None, None)), 1000).config == asked


def test_fully_masked_rows_give_zero_and_minus_inf():
    # Rows q < kv_len - q_len keep nothing under bottom-right causal with Sq > Skv.
    attn = flexdsl.compile("where q + kv_len - q_len >= kv", options=TRITON)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 23, 16), torch.randn(1, 2, 23, 16)
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :17], torch.zeros_like(out[:, :, :17]))
    assert torch.isneginf(lse[:, :, :17]).all() and torch.isfinite(lse[:, :, 17:]).all()


def test_unsorted_documents_stay_correct():
    # The run tensors assume sorted ids; unsorted ones must fall back to masking, not skip.
    attn = flexdsl.compile("where doc[q] == doc[kv]", options=TRITON)
    gen = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 3, (50,), generator=gen)
    q, k, v = (torch.randn(1, 1, 50, 16, generator=gen) for _ in range(3))
    out = attn(q, k, v, doc=doc)
    ref, _ = attn.reference(q, k, v, doc=doc)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("spec", ["where doc[q] == doc[kv] and q >= kv",
                                  "score + slope[h] * (kv - q) where doc[q] == doc[kv]"])
def test_unsorted_documents_forward_and_backward(spec):
    # Sorted ids (the other documents tests) have partial tiles test each row's run
    # (EXACT_RUNS); for unsorted ones the runs are the whole range, and the kernels must
    # compare the ids instead.
    def unsorted(batch, heads, q_len, kv_len, gen, device):
        return torch.randint(0, 3, (max(q_len, kv_len),), generator=gen).to(device)
    tensors = {"doc": unsorted, **({"slope": alibi_slopes} if "slope" in spec else {})}
    case = Case("unsorted_documents", spec, tensors=tensors)
    _check(case, 37, 45, torch.float32, seed=41)


def test_strided_inputs_and_head_dim_padding():
    # Non-contiguous views (heads and length swapped) and a head dim of 24, padded to 32,
    # forward and backward.
    attn = flexdsl.compile("where 0 <= q - kv < W", options=TRITON, W=9)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 30, 2, 24, generator=gen).transpose(1, 2).requires_grad_()
               for _ in range(3))
    assert not q.is_contiguous()
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attn.reference(*inputs)
    grad = torch.randn(ref.shape, generator=gen)
    want = torch.autograd.grad(ref, inputs, grad.double())
    for _ in range(2):   # the second call takes the launches the first prepared
        out = attn(q, k, v)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        # Gradients come in the inputs' layout, and a gradient of another layout is read as
        # it is (here a view whose heads and length are swapped).
        swapped = grad.transpose(1, 2).contiguous().transpose(1, 2)
        got = torch.autograd.grad(out, [q, k, v], swapped)
        for g, w, t in zip(got, want, (q, k, v)):
            assert g.stride() == t.stride()
            torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 0.3])
def test_any_scale_sign(scale):
    # Full tiles take the row maximum of q.k before scaling: the minimum when scale < 0.
    attn = flexdsl.compile("where q >= kv", options=TRITON)
    gen = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 2, 41, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, scale=scale)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attn.reference(q64, k64, v64, scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, [q, k, v], grad)
    want = torch.autograd.grad(ref, [q64, k64, v64], grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("divisor", [-3, 1, 5, 64])
def test_floor_division_by_a_parameter(divisor):
    # Divisors fixed per program take the multiply-high path; numerators go negative here.
    attn = flexdsl.compile("score + ((q - kv - 7) // D) * 0.01 + ((kv - q) % D) * 0.02",
                           options=TRITON)
    gen = torch.Generator().manual_seed(19)
    q, k, v = (torch.randn(1, 1, 37, 16, generator=gen) for _ in range(3))
    out = attn(q, k, v, D=divisor)
    ref, _ = attn.reference(q, k, v, D=divisor)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def _head_divisors(batch, heads, q_len, kv_len, gen, device):
    return torch.tensor([3, -5, 4, 1, 7, -8, 2, 6][:heads], device=device)


@pytest.mark.parametrize("spec", [
    "score + 0.1 * ((kv - q) // W[h]) + 0.05 * ((q + 3) % W[h]) where q >= kv",
    "where q >= kv and (q - kv) % W[h] != 1",
])
def test_divisors_per_head(spec):
    # Divisors prepared before the loop: in the dk/dv pass, one that names h is prepared per
    # head of the group (the score), or the loops stay nested (the mask). Signs and powers of
    # two included.
    _check(Case("per_head_divisor", spec, tensors={"W": _head_divisors}), 29, 35,
           torch.float32, heads=4, kv_heads=2, seed=21)


def test_tables_without_gradients_cost_nothing_and_stay_correct():
    # A score table that does not require grad skips its reduction; q, k, v grads still match.
    attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv", options=TRITON)
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 2, 29, 16, generator=gen, requires_grad=True) for _ in range(3))
    slope = torch.rand(2, generator=gen)
    out = attn(q, k, v, slope=slope)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, [q, k, v], grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attn.reference(q64, k64, v64, slope=slope.double())
    want = torch.autograd.grad(ref, [q64, k64, v64], grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=0)
    assert slope.grad is None


@pytest.mark.parametrize("spec, params", [
    ("score + (kv - q) ** 3 * 1e-3", {}),              # odd power of a negative base
    ("score + (kv - q) ** 4 * 1e-4 where q >= kv", {}),
    ("score * (kv - q + 0.5) ** -1", {}),              # a negative literal power
    ("score + (kv - q + 0.5) ** P * 1e-4", {"P": 3.0}),   # a parameter power, negative bases
    ("score + 0 ** q + q ** 0", {}),                   # 0 ** 0 is 1
    ("score + (7 % -3) * (-7 // -2) + 2 ** 10 * 1e-3", {}),   # literals folded as Python does
    ("score + 1e-3 * F ** 3 + 1e-4 * P ** 2", {"F": -1.5, "P": -7}),  # parameter bases
])
def test_powers_and_literals_as_torch_computes_them(spec, params):
    # exp2(y * log2(x)) is NaN for a negative x: powers go by products or by _pow.
    _check(Case("powers", spec, params), 21, 19, torch.float32)


def test_nested_powers_render_their_base_once():
    # By products written out, (x ** 63) ** 63 repeated x's text 3969 times; (x ** 7) ** 9, 63.
    spec = "score + (((kv - q) * 0.001 + 1.0) ** 7) ** 9 * 1e-2 + ((kv - q) * 0.1) ** 5 * 1e-4"
    attn = flexdsl.compile(spec, options=TRITON)
    text = kernel_compile.compiled(attn.spec, attn.analysis, attn.derivatives,
                                   fast_tanh=False).source.text
    assert "_ipow(_ipow(" in text and text.count("* 0.001") <= 8
    _check(Case("nested_powers", spec), 21, 19, torch.float32)


def test_a_divisor_of_positions_that_reaches_zero_is_refused_like_the_torch_path():
    q = torch.randn(1, 2, 20, 16)
    for options in (TRITON, None):
        with pytest.raises(flexdsl.SpecCallError, match="division by zero in 'q // \\(kv - 3\\)'"):
            flexdsl.compile("where q // (kv - 3) >= 1", options=options)(q, q, q)
    odd = flexdsl.compile("where q % (2 * kv + 1) == 0", options=TRITON)
    torch.testing.assert_close(odd(q, q, q), odd.reference(q, q, q)[0].float())


def test_a_divisor_zero_only_where_the_mask_drops_runs_on_every_path():
    spec = "score + (q // (q - kv)) * 0.1 + kv % (q - kv) * 0.01 where q > kv"
    q = torch.randn(1, 2, 20, 16)
    reference = flexdsl.compile(spec).reference(q, q, q)[0].float()
    for options in (TRITON, None):
        torch.testing.assert_close(flexdsl.compile(spec, options=options)(q, q, q), reference)


def test_a_modulo_by_a_negative_parameter_is_a_range_like_any_other():
    q = torch.randn(1, 1, 20, 16)
    for options in (TRITON, None):
        with pytest.raises(flexdsl.SpecCallError, match="goes down to -3"):
            flexdsl.compile("score + bias[q % D]", options=options)(q, q, q, bias=torch.randn(8),
                                                                    D=-4)


def test_log_buckets_are_exact_where_log2_is_not():
    # A log2 an ulp low at a power of two floors to the bucket below (torch's float64 log2 on
    # CUDA is, at 8.0): the kernels correct an estimate off by a little either way to the
    # exact floor and ceiling.
    import triton
    import triton.language as tl
    attn = flexdsl.compile("score + bias[floor(log2(q - kv + 1))] where q >= kv",
                           options=TRITON)
    module = kernel_compile.compiled(attn.spec, attn.analysis, attn.derivatives,
                                     fast_tanh=False).module
    # The kernel below finds the helpers among this module's globals (triton's interpreter
    # does not see a closure's).
    global _floor_log2_under_test, _ceil_log2_under_test
    _floor_log2_under_test, _ceil_log2_under_test = (module._exact_floor_log2,
                                                     module._exact_ceil_log2)

    @triton.jit
    def buckets(X, E, F, C, N: tl.constexpr):
        i = tl.arange(0, N)
        x, estimate = tl.load(X + i), tl.load(E + i)
        tl.store(F + i, _floor_log2_under_test(x, estimate))
        tl.store(C + i, _ceil_log2_under_test(x, estimate))

    x = torch.tensor([1, 2, 3, 4, 7, 8, 9, 1023, 1024, 1025, 0.5, 0.75, 2.0 ** 20, 3.0 * 2 ** 40,
                      2.0 ** -20, 5.0, 6.0, 2.0 ** 100], dtype=torch.float64)
    x = torch.cat([x, x.new_ones(32 - len(x))])
    for shift in (-1e-6, 0.0, 1e-6):
        estimate = (torch.log2(x) + shift).float()
        got_floor, got_ceil = torch.empty(32), torch.empty(32)
        buckets[(1,)](x.float(), estimate, got_floor, got_ceil, N=32)
        assert torch.equal(got_floor.double(), torch.floor(torch.log2(x))), shift
        assert torch.equal(got_ceil.double(), torch.ceil(torch.log2(x))), shift
    bias = torch.randn(8)
    q = torch.randn(1, 1, 40, 8)
    torch.testing.assert_close(attn(q, q, q, bias=bias),
                               attn.reference(q, q, q, bias=bias)[0].float())


def test_a_mask_comparing_a_float_per_head():
    gate = Case("gate", "where gate[h] > 0.3 and q >= kv", tensors={
        "gate": lambda batch, heads, q_len, kv_len, gen, device: torch.rand(heads, generator=gen)})
    _check(gate, 23, 23, torch.float32, learn_tensors=False)


def test_integer_powers_past_32_bits_are_refused_on_the_kernels():
    attn = flexdsl.compile("score + (kv - q) ** 9 * 1e-12", options=TRITON)
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(flexdsl.SpecCallError, match="32-bit"):
        attn(q, q, q)


def test_lookups_no_formula_bounds_are_checked_like_the_torch_path(monkeypatch):
    # The kernels clamp an index that leaves its tensor; a call must refuse it instead.
    from flexdsl import eager
    attn = flexdsl.compile("score + tab[doc[q]]", options=TRITON)
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    tab, doc = torch.randn(4), torch.arange(20) % 4
    torch.testing.assert_close(attn(q, k, v, tab=tab, doc=doc),
                               attn.reference(q, k, v, tab=tab, doc=doc)[0].float())
    # tab[doc[q]]: the values of doc over q's range bound the index, O(len(doc)).
    evaluations = []
    monkeypatch.setattr(eager, "evaluate", lambda *a: evaluations.append(a) or None)
    monkeypatch.setattr(EvaluatedChecks, "_check_slice", lambda *a: evaluations.append(a))
    attn(q, k, v, tab=tab, doc=doc)
    attn(q, k, v, tab=torch.randn(4), doc=doc)   # a new table of the same size: not read
    assert not evaluations, "the same index tensors, unchanged: checked once"
    monkeypatch.undo()
    doc[3] = 7   # in place: its version moves
    with pytest.raises(flexdsl.SpecCallError, match="tab\\[doc\\[q\\]\\] reaches 7"):
        attn(q, k, v, tab=tab, doc=doc)
    with pytest.raises(flexdsl.SpecCallError, match="reaches 19"):
        flexdsl.compile("score + bias[q // X]", options=TRITON)(q, k, v, bias=torch.randn(5),
                                                                 X=1)
    # Positions the mask drops need no valid index, on both paths.
    for spec in ("score + bias[floor(log2(q - kv + 1))] where q >= kv",
                 "score + bias[floor(log2(q - kv + 1)) - 1] where q > kv"):
        buckets = flexdsl.compile(spec, options=TRITON)
        bias = torch.randn(5)
        torch.testing.assert_close(buckets(q, k, v, bias=bias),
                                   buckets.reference(q, k, v, bias=bias)[0].float())
        torch.testing.assert_close(flexdsl.compile(spec)(q, k, v, bias=bias),
                                   buckets.reference(q, k, v, bias=bias)[0].float())


def test_lse_gradient():
    attn = flexdsl.compile("where q >= kv", options=TRITON)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    out, lse = attn(q, k, v, return_lse=True)
    (gq,) = torch.autograd.grad((out.sum() + lse.sum()), [q])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attn.reference(q64, k64, v64)
    (rq,) = torch.autograd.grad(ref_out.sum() + ref_lse.sum(), [q64])
    torch.testing.assert_close(gq.double(), rq, atol=1e-4, rtol=0)
    # Only lse used: out's gradient comes as None and counts as zeros.
    (gq,) = torch.autograd.grad(attn(q, k, v, return_lse=True)[1].sum(), [q])
    (rq,) = torch.autograd.grad(attn.reference(q64, k64, v64)[1].sum(), [q64])
    torch.testing.assert_close(gq.double(), rq, atol=1e-4, rtol=0)


def test_a_backward_reuses_its_forwards_run_tensors(monkeypatch):
    # The host path of a step: the run tensors of sorted lookups are made by the forward, and
    # the backward finds them (kept per ids tensor) instead of making them again.
    from flexdsl.analysis import plan
    made = []
    real = plan._runs_of
    monkeypatch.setattr(plan, "_runs_of", lambda ids: made.append(1) or real(ids))
    attn = flexdsl.compile("where doc[q] == doc[kv] and q >= kv", options=TRITON)
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=gen, requires_grad=True) for _ in range(3))
    doc = torch.tensor([0] * 11 + [1] * 20 + [2] * 6)
    out = attn(q, k, v, doc=doc)
    assert len(made) == 2                      # one per direction: keys per query, and back
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    assert len(made) == 2
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attn.reference(*inputs, doc=doc)[0].sum(), inputs)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)


def test_repeated_calls_skip_the_checks_not_what_changed(monkeypatch):
    # A call like an earlier one (same geometry, dtypes, devices, scale and parameters) goes
    # straight to its prepared launches; anything that differs is checked again, and ids
    # written in place between calls give new document runs.
    from flexdsl import api
    checked = []
    real = api.Attention._call
    monkeypatch.setattr(api.Attention, "_call",
                        lambda *a, **kw: checked.append(1) or real(*a, **kw))
    attn = flexdsl.compile("where doc[q] == doc[kv] and q - kv >= S", options=TRITON)
    gen = torch.Generator().manual_seed(29)
    doc = torch.tensor([0] * 11 + [1] * 20 + [2] * 6)

    def step(shift, doc):
        q, k, v = (torch.randn(1, 2, 37, 16, generator=gen, requires_grad=True)
                   for _ in range(3))
        out = attn(q, k, v, S=shift, doc=doc)
        grads = torch.autograd.grad(out.sum(), [q, k, v])
        inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attn.reference(*inputs, S=shift, doc=doc)[0]
        want = torch.autograd.grad(ref.sum(), inputs)
        for got, expected in zip((out, *grads), (ref, *want)):
            torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)
        with torch.no_grad():   # the same key without autograd: the forward alone
            torch.testing.assert_close(attn(q, k, v, S=shift, doc=doc), out.detach())

    step(2, doc)
    step(2, doc)                      # new q, k, v of the same geometry: not checked again
    assert len(checked) == 1
    # Nor does it compare tensors with == on the way (`x in tensors` does: ~40 us a tensor).
    compared = []
    equal = torch.Tensor.__eq__
    monkeypatch.setattr(torch.Tensor, "__eq__",
                        lambda *a: compared.append(1) or equal(*a))
    q = torch.randn(1, 2, 37, 16, generator=gen, requires_grad=True)
    attn(q, q, q, S=2, doc=doc).sum().backward()
    monkeypatch.setattr(torch.Tensor, "__eq__", equal)
    assert not compared
    step(3, doc)                      # a new parameter value (rows 0-2 of each document empty)
    assert len(checked) == 2
    doc[20:] += 1                     # written in place: its runs are made again
    step(3, doc)
    step(3, torch.tensor([0] * 20 + [1] * 17))   # other ids of the same size, a new tensor
    with torch.inference_mode():      # ids with no version counter: runs made every call
        ids = torch.tensor([0] * 5 + [1] * 32)
        q = torch.randn(1, 2, 37, 16, generator=gen)
        ref = attn.reference(q, q, q, S=3, doc=ids)[0]
        for _ in range(2):
            torch.testing.assert_close(attn(q, q, q, S=3, doc=ids).double(), ref, atol=1e-4,
                                       rtol=0)
            ids[30:] = 2
            ref = attn.reference(q, q, q, S=3, doc=ids)[0]
    assert len(checked) == 2
    with pytest.raises(flexdsl.SpecCallError, match="too short"):
        step(3, doc[:30])
    with pytest.raises(flexdsl.SpecCallError, match="share a dtype"):
        q = torch.randn(1, 2, 37, 16)
        attn(q, q.double(), q, S=3, doc=doc)


def test_an_attention_that_ran_copies_and_keeps_its_defaults(monkeypatch):
    # copy.deepcopy (an average of a model's weights, say) or pickle (torch.save of a model)
    # of an Attention that has run: the copy leaves the prepared launches behind and
    # prepares its own. Its defaults are read-only, since calls are prepared with them.
    import copy
    import pickle
    slope = torch.tensor([0.5, 0.25])
    attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv and kv >= q - W",
                           options=TRITON, slope=slope, W=7)
    q = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(31))
    out = attn(q, q, q)
    saved = pickle.dumps(attn)
    # As in a new process, where the kernels' registry starts empty.
    from flexdsl.kernel import ops
    monkeypatch.setattr(ops, "registry", {})
    for twin in (copy.deepcopy(attn), pickle.loads(saved)):
        assert twin.defaults["slope"] is not slope and not twin._kernel_calls
        torch.testing.assert_close(twin(q, q, q), out)
        with pytest.raises(TypeError):
            twin.defaults["W"] = 3
    with pytest.raises(TypeError):
        attn.defaults["slope"] = slope * 2


def test_second_derivatives_fail_loudly():
    # The kernels' gradients have no graph: a gradient penalty through them must raise, not
    # treat dq as a constant.
    attn = flexdsl.compile("where q >= kv", options=TRITON)
    q, k, v = (torch.randn(1, 1, 20, 16, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), [q], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((dq ** 2).sum() + out.sum(), [q])
    # Without create_graph the gradients are plain tensors, as before.
    (dq,) = torch.autograd.grad(attn(q, k, v).sum(), [q])
    assert dq.grad_fn is None and not dq.requires_grad


def test_row_table_gradients_with_an_lse_gradient():
    # Tables indexed without kv (slope[h], bq[q]) finish their sums per query row in the dq
    # pass with the row's own delta; a gradient on lse shifts that delta.
    attn = flexdsl.compile("score + slope[h] * (kv - q) + bq[q] where q >= kv and q - kv < 23",
                           options=TRITON)
    gen = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(2, 3, 41, 16, generator=gen) for _ in range(3))
    tensors = {"slope": torch.rand(3, generator=gen), "bq": torch.randn(41, generator=gen)}
    g_out, g_lse = torch.randn(2, 3, 41, 16, generator=gen), torch.randn(2, 3, 41, generator=gen)
    for lse_weight in (0.0, 1.0):
        grads = []
        for run, dtype in ((attn, torch.float32), (attn.reference, torch.float64)):
            inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, *tensors.values())]
            out, lse = run(*inputs[:3], **dict(zip(tensors, inputs[3:])), **(
                {"return_lse": True} if run is attn else {}))
            loss = (out * g_out.to(dtype)).sum() + lse_weight * (lse * g_lse.to(dtype)).sum()
            grads.append(torch.autograd.grad(loss, inputs))
        for got, want in zip(*grads):
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got.double() / scale, want / scale, atol=1e-5, rtol=0)


def test_slope_gradient_is_not_hurt_by_the_rounded_output():
    # delta = rowsum(O * dO) from a bf16 O is off by O's rounding, and a slope's gradient
    # weighs each row's error by the distance q - kv: 1% of the gradient at 300 tokens.
    # The dq pass's own sum(P * dP) leaves only fp32 rounding.
    attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv", options=TRITON)
    gen = torch.Generator().manual_seed(19)
    q, k, v, g_out = (torch.randn(1, 2, 300, 32, generator=gen).to(torch.bfloat16)
                      for _ in range(4))
    slope = torch.tensor([2.0 ** -1, 2.0 ** -6])
    grads = []
    for run, dtype in ((attn, torch.bfloat16), (attn.reference, torch.float64)):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        s = slope.to(torch.float32 if dtype == torch.bfloat16 else dtype).requires_grad_()
        out = run(*inputs, slope=s)
        out = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad(out, [s], g_out.to(out.dtype))[0])
    got, want = grads
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_new_lengths_and_parameters_never_render_again():
    attn = flexdsl.compile("cap * tanh(score / cap) where 0 <= q - kv < W", options=TRITON)
    gen = torch.Generator().manual_seed(13)
    before = None
    for i, (length, window) in enumerate([(5, 3), (17, 3), (31, 8), (40, 8), (23, 100)]):
        q, k, v = (torch.randn(1, 1, length, 16, generator=gen) for _ in range(3))
        out = attn(q, k, v, W=window, cap=1.0 + i)
        ref, _ = attn.reference(q, k, v, W=window, cap=1.0 + i)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        if before is None:
            before = kernel_compile.renders
    assert kernel_compile.renders == before
    # Lengths, parameters and tensor sizes are never specialised on by Triton either.
    source = next(m.source for key, m in kernel_compile._modules.items()
                  if key[0] == str(attn.spec))
    assert {"q_len", "kv_len", "p_W", "p_cap"} <= set(source.no_specialize)
    assert "do_not_specialize=[" in source.text


def test_ln_of_lse_matches_torch_convention():
    attn = flexdsl.compile("score", options=TRITON)
    q, k, v = torch.zeros(1, 1, 3, 16), torch.zeros(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    _, lse = attn(q, k, v, return_lse=True)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(5)))


def test_torch_compile_fullgraph_matches_eager():
    attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv", options=TRITON)
    compiled_step_matches_eager(attn, heads=2, length=40)


def test_direct_launches_find_their_kernel_by_raw_ints_and_tensor_alignment(monkeypatch):
    # After the first launch, later ones look their compiled kernel up by the raw ints and
    # each tensor's dtype and alignment; ints the first launch did not see take the full
    # specialisation once. A misaligned tensor must not reuse the aligned kernel.
    from flexdsl.kernel import direct
    from triton import knobs
    runs = []

    class Compiled:
        packed_metadata = function = None

        def run(self, *args):
            runs.append(args)

    class Kernel:
        arg_names = ["X", "n", "s", "BLOCK"]

    monkeypatch.setattr(direct, "supported", lambda: True)
    monkeypatch.setattr(direct, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    for table in ("_launchers", "_layouts", "_quick"):
        monkeypatch.setattr(direct, table, {})
    x = torch.zeros(64)
    key = ("test", 0)
    assert not direct.launch(key, 0, (1,), (x, 32, 0.5))
    direct.remember(key, 0, Kernel(), Compiled(), (x, 32, 0.5), {"BLOCK": 16})
    assert direct.launch(key, 0, (1,), (torch.zeros(64), 32, 2.0))
    assert direct.launch(key, 0, (1,), (x, 48, 0.5))           # specialised alike: found
    assert (key, 0, (48,), ((torch.float32, True),)) in direct._quick
    assert not direct.launch(key, 0, (1,), (x, 33, 0.5))       # 33 is not a multiple of 16
    assert not direct.launch(key, 0, (1,), (x[1:], 32, 0.5))   # not 16-byte aligned
    assert not direct.launch(key, 0, (1,), (x.double(), 32, 0.5))
    assert len(runs) == 2 and runs[0][-1] == 16                 # the constexpr goes last


def test_launch_specialisation_key_separates_what_triton_compiles_for():
    # The direct-launch cache may reuse a compiled kernel only for arguments Triton would
    # have specialised the same way.
    from flexdsl.kernel.direct import specialisation
    x = torch.zeros(64)
    assert specialisation([x, 1, 32, 0.5]) == specialisation([torch.zeros(64), 1, 48, 2.0])
    assert specialisation([x, 1]) != specialisation([x, 2])          # 1 is a constant
    assert specialisation([x, 32]) != specialisation([x, 33])        # divisible by 16
    assert specialisation([x, 3]) != specialisation([x, 2**40])      # int32 vs int64
    assert specialisation([x]) != specialisation([x[1:]])            # 16-byte alignment
    assert specialisation([x]) != specialisation([x.half()])         # dtype
    assert specialisation([x, 2]) != specialisation([x, 2.0])        # int vs float
