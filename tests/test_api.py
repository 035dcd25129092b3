"""The Python API at call time: every wrong input is a SpecCallError that names what is wrong,
and defaults bound by compile() give way to what a call passes."""
import math

import pytest
import torch
from carets import raises_at

import flexdsl
from flexdsl import SpecCallError

SPEC = "score + slope[h] * (kv - q) where 0 <= q - kv < W and doc[q] == doc[kv]"
#        0         1         2         3         4         5         6         7
#        0123456789012345678901234567890123456789012345678901234567890123456789012345
F64 = torch.float64


@pytest.fixture(scope="module")
def attn():
    return flexdsl.compile(SPEC)


def qkv(batch=2, heads=4, kv_heads=2, q_len=7, kv_len=9, dim=8, dtype=F64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen, dtype=dtype)
    return q, k, v


def good(**change):
    """Keyword arguments that SPEC accepts for qkv()'s default shapes, with ``change``."""
    kwargs = {"W": 3, "slope": torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=F64),
              "doc": torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])}
    kwargs.update(change)
    return {k: v for k, v in kwargs.items() if v is not None}


def test_a_good_call_matches_the_reference(attn):
    q, k, v = qkv()
    out, lse = attn(q, k, v, return_lse=True, **good())
    want, want_lse = attn.reference(q, k, v, **good())
    assert out.shape == (2, 4, 7, 8) and lse.shape == (2, 4, 7)
    assert (out - want).abs().max().item() < 1e-12
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - want_lse[finite]).abs().max().item() < 1e-12


def test_call_arguments_override_compile_defaults():
    q, k, v = qkv()
    narrow = flexdsl.compile("where 0 <= q - kv < W", W=1)
    assert torch.allclose(narrow(q, k, v), v.repeat_interleave(2, dim=1)[:, :, :7])
    wide = narrow(q, k, v, W=100)
    assert torch.allclose(wide, flexdsl.compile("where q >= kv")(q, k, v), atol=1e-12)


def test_scale_is_applied():
    q, k, v = qkv()
    attn = flexdsl.compile("score")
    plain = attn(q, k, v)
    assert torch.allclose(attn(q, k, v, scale=1 / math.sqrt(8)), plain, atol=1e-12)
    assert torch.allclose(attn(q * 2, k, v, scale=0.5 / math.sqrt(8)), plain, atol=1e-12)
    assert not torch.allclose(attn(q, k, v, scale=0.01), plain, atol=1e-3)


# -- parameters and tensors: missing, unknown, mistyped -----------------------------------------

@pytest.mark.parametrize("change, message, column", [
    ({"W": None}, "missing parameter 'W' (int)", 48),
    ({"slope": None}, "missing tensor 'slope' (float, rank 1)", 8),
    ({"doc": None}, "missing tensor 'doc' (int, rank 1)", 54),
    ({"W": 3.5}, "parameter 'W' is an int, got 3.5", 48),
    ({"W": True}, "parameter 'W' must be a Python number, got bool", 48),
    ({"W": "3"}, "parameter 'W' must be a Python number, got str", 48),
    ({"W": torch.tensor(3)}, "parameter 'W' must be a Python number, got Tensor", 48),
    ({"slope": [0.5] * 4}, "'slope' must be a torch.Tensor, got list", 8),
    ({"slope": torch.rand(1, 4, dtype=F64)},
     "'slope' is indexed with 1 index in the spec but has 2 dimensions (shape (1, 4))", 8),
    ({"doc": torch.zeros(9, 1, dtype=torch.long)}, "'doc' is indexed with 1 index", 54),
    ({"slope": torch.arange(4)}, "'slope' must hold floats, got torch.int64", 8),
    ({"doc": torch.zeros(9, dtype=F64)}, "'doc' must hold integers, got torch.float64", 54),
    ({"doc": torch.zeros(9, dtype=torch.bool)}, "'doc' must hold integers, got torch.bool", 54),
    ({"slope": torch.rand(4, dtype=F64, device="meta")}, "'slope' is on meta but q is on cpu", 8),
])
def test_parameter_and_tensor_errors_name_them(attn, change, message, column):
    q, k, v = qkv()
    error = raises_at(lambda: attn(q, k, v, **good(**change)), message, column,
                      kind=SpecCallError)
    assert error.spec == SPEC
    # the oracle validates the same way
    raises_at(lambda: attn.reference(q, k, v, **good(**change)), message, column)


def test_unknown_names_are_refused_with_the_nearest_one(attn):
    q, k, v = qkv()
    with pytest.raises(SpecCallError, match="unknown parameter or tensor 'Wx'") as info:
        attn(q, k, v, **good(Wx=3))
    assert info.value.hint == "did you mean 'W'?"
    with pytest.raises(SpecCallError, match="unknown parameter or tensor 'zzz'") as info:
        attn(q, k, v, **good(zzz=3))
    assert info.value.hint == "this spec takes W, slope, doc"


def test_compile_checks_what_it_binds():
    raises_at(lambda: flexdsl.compile("where q < W", W=2.5), "parameter 'W' is an int, got 2.5",
              10, kind=SpecCallError)
    with pytest.raises(SpecCallError, match="unknown parameter or tensor 'V'") as info:
        flexdsl.compile("where q < W", V=2)
    assert info.value.spec == "where q < W"
    with pytest.raises(SpecCallError, match="unknown parameter or tensor 'W'") as info:
        flexdsl.compile("where q >= kv", W=2)
    assert info.value.hint == "this spec takes no parameters or tensors"


def test_float_parameters_take_ints_but_not_nan():
    q, k, v = qkv()
    attn = flexdsl.compile("cap * tanh(score / cap)")
    assert torch.allclose(attn(q, k, v, cap=2), attn(q, k, v, cap=2.0))
    raises_at(lambda: attn(q, k, v, cap=float("nan")), "parameter 'cap' is NaN", 0)


# -- q, k and v ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda q, k, v: (q[0], k, v), "q must have 4 dimensions (batch, heads, length, head_dim), "
                                   "got shape (4, 7, 8)"),
    (lambda q, k, v: (q, k[..., None], v), "k must have 4 dimensions"),
    (lambda q, k, v: (q, k, v.tolist()), "v must be a torch.Tensor, got list"),
    (lambda q, k, v: (q.float(), k, v), "q, k and v must share a dtype, got torch.float32, "
                                        "torch.float64, torch.float64"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), "q has dtype torch.int64"),
    (lambda q, k, v: (q, k, v.to("meta")), "q, k and v must be on one device"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must agree in batch, heads and length, "
                                          "got (2, 2, 9, 8) and (2, 2, 5, 8)"),
    (lambda q, k, v: (q[:1], k, v), "q and k have batch sizes 1 and 2"),
    (lambda q, k, v: (q[..., :4], k, v), "q and k have head dims 4 and 8"),
    (lambda q, k, v: (q[:, :3], k, v), "q has 3 heads, k and v 2: for grouped-query attention "
                                       "the query heads must be a multiple of the key heads"),
])
def test_qkv_errors_name_the_input(attn, make, message):
    q, k, v = make(*qkv())
    with pytest.raises(SpecCallError) as info:
        attn(q, k, v, **good())
    assert message in info.value.message
    assert info.value.spec == SPEC


def test_kernels_want_v_with_qs_head_dim():
    # The chunked path takes any head dim for v; the kernels read v with q's, so a narrower v
    # must be an error there, not a read past its rows.
    kernels = flexdsl.compile("where q >= kv", options=flexdsl.KernelOptions(backend="triton"))
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    v = torch.randn(1, 2, 9, 8)
    with pytest.raises(SpecCallError, match="v has head dim 8 and q 16: the kernels need"):
        kernels(q, k, v)
    out = flexdsl.compile("where q >= kv")(q, k, v)
    torch.testing.assert_close(out.double(), flexdsl.compile("where q >= kv").reference(
        q, k, v)[0], atol=1e-5, rtol=0)


def test_scale_must_be_a_number(attn):
    with pytest.raises(SpecCallError, match="scale must be a number, got str"):
        attn(*qkv(), scale="0.1", **good())


# -- tensors too short for the index ranges the spec derives ------------------------------------

def test_too_short_for_the_heads(attn):
    q, k, v = qkv()
    error = raises_at(lambda: attn(q, k, v, **good(slope=torch.rand(2, dtype=F64))),
                      "'slope' is too short: dimension 0 has size 2, but index 'h' reaches 3 "
                      "(q_len=7, kv_len=9), so it needs size >= 4", 14, 1, kind=SpecCallError)
    assert error.hint == "'h' spans [0, n_heads - 1]"


def test_too_short_for_the_keys(attn):
    q, k, v = qkv()
    error = raises_at(lambda: attn(q, k, v, **good(doc=torch.zeros(8, dtype=torch.long))),
                      "'doc' is too short: dimension 0 has size 8, but index 'kv' reaches 8 "
                      "(q_len=7, kv_len=9), so it needs size >= 9", 68, 2, kind=SpecCallError)
    assert error.hint == "'kv' spans [0, kv_len - 1]"


def test_too_short_for_a_relative_position():
    q, k, v = qkv()
    attn = flexdsl.compile("score + bias[h, q - kv + kv_len]")
    error = raises_at(lambda: attn(q, k, v, bias=torch.randn(4, 15, dtype=F64)),
                      "'bias' is too short: dimension 1 has size 15, but index 'q - kv + kv_len' "
                      "reaches 15 (q_len=7, kv_len=9), so it needs size >= 16", 16, 15,
                      kind=SpecCallError)
    assert error.hint == "'q - kv + kv_len' spans [1, kv_len + q_len - 1]"
    out = attn(q, k, v, bias=torch.randn(4, 16, dtype=F64))  # exactly long enough
    assert out.shape == q.shape


def test_an_index_below_zero():
    q, k, v = qkv()
    attn = flexdsl.compile("score + bias[h, q - kv]")
    raises_at(lambda: attn(q, k, v, bias=torch.randn(4, 16, dtype=F64)),
              "index 'q - kv' of 'bias' goes down to -8 (q_len=7, kv_len=9); tensors cannot "
              "be indexed below 0", 16, 6, kind=SpecCallError)


def test_an_index_that_data_decides_is_checked_when_evaluated():
    q, k, v = qkv()
    attn = flexdsl.compile("score + table[doc[q]]")
    doc = torch.tensor([0, 1, 2, 5, 0, 0, 0])
    for call in (attn, attn.reference):
        raises_at(lambda: call(q, k, v, doc=doc, table=torch.randn(3, dtype=F64)),
                  "index out of range: table[doc[q]] reaches 5 in dimension 0, whose size is 3",
                  14, 6)
    out = attn(q, k, v, doc=doc, table=torch.randn(6, dtype=F64))
    assert out.shape == q.shape


def test_division_by_zero_in_a_parameter():
    attn = flexdsl.compile("where q // C >= kv // C")
    raises_at(lambda: attn.reference(*qkv(), C=0), "division by zero in 'q // C'", 11, 1,
              kind=SpecCallError)
    # the CPU path plans its tiles first, and the plan refuses C first
    raises_at(lambda: attn(*qkv(), C=0), "'C'", 11, 1, kind=SpecCallError)


def test_a_zero_divisor_parameter_is_refused_on_every_path():
    for spec, params, column in (("where abs(q - kv) <= W and (q - kv) % D == 0",
                                  {"W": 4, "D": 0}, 38), ("score / T", {"T": 0.0}, 8)):
        for backend in ("torch", "triton"):
            attn = flexdsl.compile(spec, options=flexdsl.KernelOptions(backend=backend))
            raises_at(lambda: attn(*qkv(), **params), "division by zero in", column, 1,
                      kind=SpecCallError)


def test_integers_past_what_the_path_computes_in_are_refused():
    import sys
    window = "where 0 <= q - kv < W"
    torch_path = flexdsl.compile(window)
    kernels = flexdsl.compile(window, options=flexdsl.KernelOptions(backend="triton"))
    # 64 bits: refused everywhere (torch could not even take 2**63)
    for attn in (torch_path, kernels):
        for big in (sys.maxsize, 2 ** 63, -2 ** 64):
            raises_at(lambda: attn(*qkv(), W=big), "'W'", 20, 1, kind=SpecCallError)
    # 32 bits: the kernels' loop bounds would wrap (a hang), their sums overflow
    error = raises_at(lambda: kernels(*qkv(), W=-2 ** 31 - 1), "32-bit", 20, 1,
                      kind=SpecCallError)
    assert "backend='torch'" in error.hint
    offset = flexdsl.compile("where q + OFF >= kv", options=flexdsl.KernelOptions(backend="triton"))
    raises_at(lambda: offset(*qkv(), OFF=2 ** 31 - 1), "'q + OFF' reaches", 6, 7,
              kind=SpecCallError)
    literal = "where q * 9999999999 >= kv"
    raises_at(lambda: flexdsl.compile(literal, options=flexdsl.KernelOptions(backend="triton"))(
        *qkv()), "32-bit", 6, 14, kind=SpecCallError)
    q, k, v = qkv()
    out, lse = flexdsl.compile(literal)(q, k, v, return_lse=True)   # 64-bit: fine
    ref_out, _ = flexdsl.compile(literal).reference(q, k, v)
    torch.testing.assert_close(out, ref_out.to(out.dtype))
    torch.testing.assert_close(torch_path(q, k, v, W=-2 ** 31 - 1), torch.zeros_like(q))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_a_scale_that_is_not_finite_is_refused(scale):
    with pytest.raises(SpecCallError, match="scale is"):
        flexdsl.compile("score")(*qkv(), scale=scale)


@pytest.mark.parametrize("call, message", [
    (lambda: flexdsl.compile(None), "a spec is text, got NoneType"),
    (lambda: flexdsl.compile(b"where q >= kv"), "a spec is text, got bytes"),
    (lambda: flexdsl.compile("score", options="triton"), "options must be a flexdsl.KernelOptions"),
    (lambda: flexdsl.compile("score", options=flexdsl.KernelOptions(backend="triton"))(*qkv()),
     "the Triton kernels need CUDA tensors"),
    (lambda: flexdsl.compile("where doc[q] == doc[kv]")(
        *qkv(), doc=torch.zeros(9, dtype=torch.uint32)), "signed integers"),
    (lambda: flexdsl.compile("score")(*qkv(dim=0)), "head dim 0"),
    (lambda: flexdsl.compile("score")(*(t.to("meta") for t in qkv())), "meta device"),
    (lambda: flexdsl.compile("score").reference(*qkv(), dtype="int64"), "float dtype"),
])
def test_inputs_no_path_can_run_are_spec_errors(call, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(flexdsl.SpecError, match=message):
        call()


def test_empty_batches_and_nothing_kept_still_differentiate():
    q, k, v = (t.requires_grad_() for t in qkv())
    for spec, tensors in (("where q < 0", {}), ("where doc[q] == doc[kv] and q > kv",
                                                 {"doc": torch.arange(9)})):
        out = flexdsl.compile(spec)(q, k, v, **tensors)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert flexdsl.compile("score")(*qkv(batch=0)).shape == (0, 4, 7, 8)


def test_an_empty_result_stays_finite_beside_an_infinite_table():
    # Tied into the graph by an empty slice's sum: t.sum() * 0 would be NaN here.
    gate = torch.tensor([0.0, -math.inf, 0.0, 0.0], dtype=F64, requires_grad=True)
    out = flexdsl.compile("score + gate[h] where kv < P")(*qkv(), gate=gate, P=0)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(torch.autograd.grad(out.sum(), gate)[0], torch.zeros_like(gate))


def test_masked_positions_give_no_nan_gradients():
    # log(q - kv) is -inf on the diagonal the mask drops: its gradient there is 0, not 0 * inf.
    attn = flexdsl.compile("score - slope[h] * log(q - kv) + exp(kv - q) where q > kv")
    q, k, v = (t.requires_grad_() for t in qkv(heads=2, kv_heads=1, q_len=9))
    slope = torch.tensor([0.5, 0.25], dtype=F64, requires_grad=True)
    for run in (attn, attn.reference):
        out = run(q, k, v, slope=slope)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out.sum(), (q, k, v, slope))
        assert all(torch.isfinite(g).all() for g in grads)


# -- errors are SpecErrors whatever the entry point ---------------------------------------------

def test_every_error_is_a_spec_error():
    assert issubclass(flexdsl.SpecCallError, flexdsl.SpecError)
    assert issubclass(flexdsl.SpecSyntaxError, flexdsl.SpecError)
    assert issubclass(flexdsl.SpecTypeError, flexdsl.SpecError)
    assert issubclass(flexdsl.SpecError, ValueError)
    with pytest.raises(flexdsl.SpecSyntaxError):
        flexdsl.compile("where q = kv")
    with pytest.raises(flexdsl.SpecTypeError):
        flexdsl.compile("score + slope[x]")


def test_compile_caches_the_checked_spec():
    assert flexdsl.compile("where q >= kv").spec is flexdsl.compile("where q >= kv").spec
    assert flexdsl.check("where q >= kv") is flexdsl.check("where q >= kv")


def test_auto_keeps_float64_on_the_path_that_computes_in_it():
    import types
    attn = flexdsl.compile("where q >= kv")
    cuda = {dtype: types.SimpleNamespace(is_cuda=True, dtype=dtype)
            for dtype in (torch.float64, torch.float32, torch.bfloat16)}
    assert not attn._uses_kernels(cuda[torch.float64])
    assert attn._uses_kernels(cuda[torch.float32]) and attn._uses_kernels(cuda[torch.bfloat16])
    assert not attn._uses_kernels(types.SimpleNamespace(is_cuda=False, dtype=torch.float32))


def test_a_function_name_or_true_is_not_a_parameter():
    raises_at(lambda: flexdsl.check("score + tanh"), "'tanh' is a function", 8, 4)
    raises_at(lambda: flexdsl.check("where q >= kv == True"), "'True' is not a value", 17, 4)


def test_an_index_of_the_score_needs_range_only_where_the_mask_keeps():
    # Causal relative positions, written as a person would: q - kv never goes below 0 where
    # q >= kv keeps a position, so a table of q_len entries is enough.
    q, k, v = qkv()
    attn = flexdsl.compile("score + bias[h, q - kv] where q >= kv")
    out = attn(q, k, v, bias=torch.randn(4, 7, dtype=F64))
    assert out.shape == q.shape
    error = raises_at(lambda: attn(q, k, v, bias=torch.randn(4, 6, dtype=F64)),
                      "'bias' is too short: dimension 1 has size 6, but index 'q - kv' reaches 6 "
                      "(q_len=7, kv_len=9), so it needs size >= 7", 16, 6, kind=SpecCallError)
    assert error.hint == "'q - kv' spans [0, q_len - 1] where the mask keeps a position"
    # A disjunction keeps kv < 3 everywhere: q - kv goes down to -2 there.
    raises_at(lambda: flexdsl.compile("score + bias[h, q - kv] where q >= kv or kv < 3")(
        q, k, v, bias=torch.randn(4, 7, dtype=F64)),
        "index 'q - kv' of 'bias' goes down to -2 (q_len=7, kv_len=9); tensors cannot be "
        "indexed below 0", 16, 6, kind=SpecCallError)
    # The mask reads its own lookups at every position: no narrowing there.
    raises_at(lambda: flexdsl.compile("where q >= kv and gate[q - kv] > 0.5")(
        q, k, v, gate=torch.randn(7, dtype=F64)),
        "index 'q - kv' of 'gate' goes down to -8 (q_len=7, kv_len=9); tensors cannot be "
        "indexed below 0", 23, 6, kind=SpecCallError)
    # The mask keeps nothing (P = 0): no index is read.
    attn = flexdsl.compile("score + bias[kv] where kv < P")
    assert attn(q, k, v, bias=torch.randn(2, dtype=F64), P=2).shape == q.shape
    assert attn(q, k, v, bias=torch.randn(1, dtype=F64), P=0).shape == q.shape


def test_bounds_with_fractions_are_exact():
    # kv < (kv_len + 2) // 3 solves to kv <= floor(kv_len/3 + 2/3) - 1 + ...: in floats,
    # floor(7/3 + 2/3) came out 2, a bound one too low, and a table one too short passed.
    q, k = torch.randn(1, 1, 3, 16, dtype=F64), torch.randn(1, 1, 7, 16, dtype=F64)
    attn = flexdsl.compile("score + bias[kv] where kv < (kv_len + 2) // 3")
    raises_at(lambda: attn(q, k, k, bias=torch.randn(2, dtype=F64)),
              "'bias' is too short: dimension 0 has size 2, but index 'kv' reaches 2", 13, 2,
              kind=SpecCallError)
    assert attn(q, k, k, bias=torch.randn(3, dtype=F64)).shape == q.shape
    q = torch.randn(1, 1, 99, 16, dtype=F64)
    raises_at(lambda: flexdsl.compile("score + bias[q // 49]")(q, q, q,
                                                               bias=torch.randn(2, dtype=F64)),
              "index 'q // 49' reaches 2", 13, 7, kind=SpecCallError)


def test_masks_comparing_keys_in_floats_are_not_narrowed():
    # sympy adds 0.7 + 0.2 + 0.1 exactly; the kernels, left to right in float32, may keep
    # kv = q + 1: the index keeps its whole range.
    attn = flexdsl.compile("score + bias[kv - q + 2] where q - 2 <= kv and kv <= q + 0.7 + 0.2 "
                           "+ 0.1")
    (r,) = attn.index_ranges
    assert attn.index_range_where_kept(r).kept is None
    # A float comparison that bounds no key leaves the narrowing on.
    attn = flexdsl.compile("score + bias[h, q - kv] where q >= kv and gate[h] > 0.3")
    assert "where the mask keeps" in attn.index_range_where_kept(attn.index_ranges[1]).describe()


def test_clipped_and_bucketed_distances_are_narrowed_too():
    # Interval arithmetic over the index, each affine part taking its range where kept.
    q, k, v = qkv()
    clipped = flexdsl.compile("score + bias[h, min(q - kv, 3)] where q >= kv")
    assert clipped(q, k, v, bias=torch.randn(4, 4, dtype=F64)).shape == q.shape
    raises_at(lambda: clipped(q, k, v, bias=torch.randn(4, 3, dtype=F64)),
              "index 'min(q - kv, 3)' reaches 3", 16, 14, kind=SpecCallError)
    halved = flexdsl.compile("score + bias[(q - kv) // 2] where q >= kv")
    assert halved(q, k, v, bias=torch.randn(4, dtype=F64)).shape == q.shape   # q_len 7: 0..3


def test_a_clamp_above_its_range_is_its_upper_bound():
    # clamp(kv + 4, -1, 2) is 2 everywhere; its interval was [4, 2], which reads as "nothing
    # kept" where ranges are narrowed, and let a table of 2 entries through.
    attn = flexdsl.compile("score + bias[clamp(kv + 4, -1, 2)] where q + kv + P < 2 * q - kv")
    (r,) = attn.index_ranges
    assert r.bounds({"q_len": 5, "kv_len": 7, "P": -4}) == (2, 2)
    q, k = torch.randn(1, 1, 5, 16, dtype=F64), torch.randn(1, 1, 7, 16, dtype=F64)
    raises_at(lambda: attn(q, k, k, bias=torch.randn(2, dtype=F64), P=-4),
              "index 'clamp(kv + 4, -1, 2)' reaches 2", 13, 20, kind=SpecCallError)
