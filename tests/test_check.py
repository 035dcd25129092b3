"""The checker: the error catalogue of issue 2 (message and caret), types and signatures."""
import pytest
from carets import raises_at

import flexdsl
from flexdsl.check import FLOAT, FUNCTIONS, INT
from flexdsl.errors import SpecSyntaxError, SpecTypeError

# -- the error catalogue: every kind, its message, the caret's column and width, and a hint ----

CATALOGUE = [
    # unknown name or function, with the nearest known one
    ("unknown name", "score + slope[x] where q>=kv", "unknown name 'x'", 14, 1, "did you mean 'h'?"),
    ("unknown name", "where k >= q", "unknown name 'k'", 6, 1, "did you mean 'kv'?"),
    ("unknown name", "score + kb", "unknown name 'kb'", 8, 2, "did you mean 'kv'?"),
    ("unknown name", "where q < qlen", "unknown name 'qlen'", 10, 4, "did you mean 'q_len'?"),
    ("unknown name", "Score + 1", "unknown name 'Score'", 0, 5, "did you mean 'score'?"),
    ("unknown function", "score + tanhh(score)", "unknown function 'tanhh'", 8, 5,
     "did you mean 'tanh'?"),
    ("unknown function", "sigmod(score)", "unknown function 'sigmod'", 0, 6,
     "did you mean 'sigmoid'?"),
    ("unknown function", "score + slope[h] + slope(q)", "unknown function 'slope'", 19, 5,
     "tensors are indexed with brackets: slope[...]"),
    # wrong arity
    ("wrong arity", "exp(score, 2)", "exp() takes 1 argument, got 2", 0, 13, "exp: e ** x"),
    ("wrong arity", "score + min(q)", "min() takes at least 2 arguments, got 1", 8, 6, None),
    ("wrong arity", "where clamp(q, 1) > kv", "clamp() takes 3 arguments, got 2", 6, 11,
     "clamp(x, lo, hi)"),
    ("wrong arity", "score + abs()", "abs() takes 1 argument, got 0", 8, 5, None),
    # bool used as a number
    ("bool as number", "score + (q >= kv)", "a condition is used as a number with '+'", 9, 7,
     "'a if condition else b'"),
    ("bool as number", "score * (q > 1 and kv > 1)", "a condition is used as a number", 9, 16,
     None),
    ("bool as number", "-(q >= kv) + score", "a condition is used as a number with unary '-'",
     2, 7, None),
    ("bool as number", "score + exp(q < kv)", "as an argument of exp()", 12, 6, None),
    ("bool as number", "score + bias[q > kv]", "a condition is used as a number as an index",
     13, 6, None),
    # float used as an index
    ("float as index", "score + bias[q / 2]", "a float is used as an index", 13, 5, "'//'"),
    ("float as index", "score + bias[h, kv * 0.5]", "a float is used as an index", 16, 8, None),
    ("float as index", "score * slope[h] + table[slope[h]]",
     "a float is used as an index", 25, 8, None),
    ("float as index", "score * W + bias[W]", "a float is used as an index", 17, 1, None),
    # a mask that is not bool
    ("mask not bool", "where q - kv", "the mask is a number, not a condition", 6, 6,
     "'where q >= kv'"),
    ("mask not bool", "score where doc[q]", "the mask is a number", 12, 6, None),
    # score inside the mask
    ("score in mask", "where q >= kv + score", "'score' cannot be used in the mask", 16, 5,
     "'score if cond else -inf'"),
    ("score in mask", "score * 2 where score > 0", "'score' cannot be used in the mask", 16, 5,
     None),
    ("score in index", "score + bias[score]", "'score' cannot be used in an index", 13, 5, None),
    ("score in index", "where doc[q // 2 + floor(score)] > 0", "'score' cannot be used in an index",
     25, 5, "int expressions"),
    # unbalanced brackets
    ("unbalanced", "score + (q", "'(' is never closed", 8, 1, "add ')'"),
    ("unbalanced", "score + q)", "unmatched ')'", 9, 1, "add the '('"),
    ("unbalanced", "score + bias[h)", "')' closes the '[' at column 13", 14, 1,
     "close it with ']'"),
    ("unbalanced", "where doc[q == doc[kv]", "'[' is never closed", 9, 1, "add ']'"),
    # empty input
    ("empty", "", "the spec is empty", 0, 1, "'where q >= kv'"),
    ("empty", "  \t ", "the spec is empty", 0, 1, None),
    # trailing text
    ("trailing text", "score where q >= kv kv", "unexpected 'kv'", 20, 2, "operator missing"),
    ("trailing text", "score score", "unexpected 'score'", 6, 5, None),
    ("trailing text", "where q >= kv)", "unmatched ')'", 13, 1, None),
    ("trailing text", "score, q", "unexpected ','", 5, 1, None),
    # '=' where '==' was meant
    ("= for ==", "where q = kv", "'=' is not a comparison", 8, 1, "write '=='"),
    ("= for ==", "where doc[q]=doc[kv]", "'=' is not a comparison", 12, 1, None),
    # a tensor used with two ranks
    ("two ranks", "score + bias[h] + bias[h, q]",
     "'bias' is indexed with 2 indexes here but 1 elsewhere", 18, 10, "one rank"),
    ("two ranks", "where doc[q] == doc[kv, q]",
     "'doc' is indexed with 2 indexes here but 1 elsewhere", 16, 10, None),
    # a divisor of literals alone that comes to 0
    ("zero divisor", "where q % 0 == 0", "division by zero: the right side of '%' is 0", 10, 1,
     "non-zero"),
    ("zero divisor", "score / 0.0", "division by zero: the right side of '/' is 0", 8, 3, None),
    ("zero divisor", "where q // (3 - 3) >= kv", "the right side of '//' is 0", 12, 5, None),
    ("zero divisor", "score + 0 ** -1", "0 to a negative power divides by zero", 8, 7, None),
]


@pytest.mark.parametrize("kind, text, message, column, width, hint", CATALOGUE,
                         ids=[f"{c[0]}: {c[1]}" for c in CATALOGUE])
def test_error_catalogue(kind, text, message, column, width, hint):
    error = raises_at(lambda: flexdsl.check(text), message, column, width)
    assert error.spec == text
    if hint:
        assert hint in error.hint
    assert str(error).splitlines()[-1] == f"hint: {error.hint}"


def test_catalogue_covers_every_kind_of_the_issue():
    kinds = {c[0] for c in CATALOGUE}
    assert {"unknown name", "unknown function", "wrong arity", "bool as number",
            "float as index", "mask not bool", "score in mask", "unbalanced", "empty",
            "trailing text", "= for ==", "two ranks"} <= kinds


def test_issue_example_renders_exactly():
    with pytest.raises(SpecTypeError) as info:
        flexdsl.check("score + slope[x] where q>=kv")
    lines = str(info.value).splitlines()
    assert lines[:3] == ["unknown name 'x'",
                         "  score + slope[x] where q>=kv",
                         "                ^"]
    assert lines[3].startswith("hint: positions are b (batch), h (head), q (query) and kv (key)")


def test_syntax_and_type_errors_are_told_apart():
    with pytest.raises(SpecSyntaxError):
        flexdsl.check("where q = kv")
    with pytest.raises(SpecTypeError):
        flexdsl.check("where q - kv")


# -- more type errors, each with its caret -----------------------------------------------------

@pytest.mark.parametrize("text, message, column", [
    ("q >= kv", "the score expression is a condition, not a number", 0),
    ("not score", "'not' needs a condition", 4),
    ("where q < kv and kv", "'and' needs conditions on both sides, this is a number", 17),
    ("score if q else 1", "the condition of 'if' is a number", 9),
    ("score if q > kv else q > kv", "one branch is a condition and the other a number", 0),
    ("score + W where W[q] > 0", "'W' is a parameter elsewhere but indexed here", 16),
    ("score + slope[h] + slope", "'slope' is a tensor and needs an index", 19),
    ("score + h[q]", "'h' is not a tensor and cannot be indexed", 8),
    ("score + kv_len[h]", "'kv_len' is not a tensor and cannot be indexed", 8),
    ("score + score[h]", "'score' is not a tensor and cannot be indexed", 8),
    ("score + t[q]", "'t' cannot name a tensor", 8),
    ("score * scale", "'scale' is an argument of every call", 8),
    ("score + return_lse[h]", "'return_lse' is an argument of every call", 8),
    ("score * W where q < W // 2", "a float is used with '//'", 20),
    ("score + 2.5 % q", "a float is used with '%'", 8),
    ("score + bias[h] where bias[q] % 2 == 0", "a float is used with '%'", 22),
])
def test_type_errors(text, message, column):
    raises_at(lambda: flexdsl.check(text), message, column, kind=SpecTypeError)


def test_check_accepts_a_parsed_spec_and_keeps_the_text():
    spec = flexdsl.parse("where q = = kv".replace("= =", ">="))
    checked = flexdsl.check(spec)
    assert checked.spec is spec
    assert checked.text == "where q >= kv"
    assert flexdsl.check(checked) is checked


def test_errors_on_a_parsed_spec_show_its_text():
    spec = flexdsl.parse("where  q - kv")
    error = raises_at(lambda: flexdsl.check(spec), "the mask is a number", 7, 6)
    assert error.spec == "where  q - kv"


# -- signatures: how parameters and tensors get their types ------------------------------------

def signature(text):
    sig = flexdsl.check(text).signature
    return ({n: p.dtype for n, p in sig.params.items()},
            {n: (t.rank, t.dtype) for n, t in sig.tensors.items()})


@pytest.mark.parametrize("text, params, tensors", [
    ("where q >= kv", {}, {}),
    ("where 0 <= q - kv < W", {"W": INT}, {}),
    ("where kv < P or q >= kv", {"P": INT}, {}),
    ("where q // C >= kv // C", {"C": INT}, {}),
    ("where abs(q - kv) <= W and (q - kv) % D == 0", {"W": INT, "D": INT}, {}),
    ("cap * tanh(score / cap) where q >= kv", {"cap": FLOAT}, {}),
    ("score + alpha * 2", {"alpha": FLOAT}, {}),
    ("score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]", {},
     {"slope": (1, FLOAT), "doc": (1, INT)}),
    ("score + bias[h, q - kv + kv_len]", {}, {"bias": (2, FLOAT)}),
    ("score + tab[doc[q]]", {}, {"tab": (1, FLOAT), "doc": (1, INT)}),
    ("where seg[b, q] == seg[b, kv]", {}, {"seg": (2, INT)}),
    ("score if q < W else T", {"W": INT, "T": FLOAT}, {}),
    ("score - T where T < 2", {"T": FLOAT}, {}),
    ("score + bias[q // B]", {"B": INT}, {"bias": (1, FLOAT)}),
    # no hard evidence, but a float-looking use: the name leans float
    ("score / T", {"T": FLOAT}, {}),
    ("score * exp(T)", {"T": FLOAT}, {}),
    ("score ** T", {"T": FLOAT}, {}),
    ("score + floor(W / 2)", {"W": FLOAT}, {}),
    ("where slope[h] > 0.5", {}, {"slope": (1, FLOAT)}),
    ("score + exp(T) where q < T", {"T": FLOAT}, {}),
    # hard evidence wins over leaning, whatever the order
    ("where W > 0.5 and q // W == 0", {"W": INT}, {}),
    ("where q / W > 1 and q // W > 0", {"W": INT}, {}),
    ("score + 0 * exp(A) where A == B and q // B == 0", {"A": INT, "B": INT}, {}),
])
def test_signature_types(text, params, tensors):
    assert signature(text) == (params, tensors)


def test_an_int_forced_first_may_then_meet_a_float():
    # int * float is fine: only a float where an int is needed is an error
    assert signature("score + table[slope[h]] + slope[h] * score") == (
        {}, {"table": (1, FLOAT), "slope": (1, INT)})


def test_tensor_uses_are_recorded_in_order():
    sig = flexdsl.check("score + slope[h]*(kv-q) where q>=kv and doc[q]==doc[kv]").signature
    assert [str(u) for u in sig.tensors["doc"].uses] == ["q", "kv"]
    assert sig.describe() == [
        "tensor    slope: float, rank 1, indexed by [h]",
        "tensor    doc: int, rank 1, indexed by [q] and by [kv]",
    ]


def test_parameter_span_is_its_first_use():
    checked = flexdsl.check("where 0 <= q - kv < W and kv > q - 2 * W")
    assert checked.signature.params["W"].span == (20, 21)


def test_type_of_subexpressions():
    checked = flexdsl.check("score + slope[h] * (kv - q) where q // C >= kv // C")
    spec = checked.spec
    assert checked.type_of(spec.score) == FLOAT
    assert checked.type_of(spec.score.right.right) == INT
    assert checked.type_of(spec.mask) == "bool"
    assert checked.type_of(spec.mask.operands[0]) == INT


def test_every_function_of_the_table_checks():
    for name, function in FUNCTIONS.items():
        args = ", ".join(["score"] * function.min_args)
        checked = flexdsl.check(f"{name}({args})")
        assert checked.type_of(checked.spec.score) in (INT, FLOAT)
