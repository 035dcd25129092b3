"""The grammar: text -> IR with spans, precedence, unparse, and syntax errors with carets."""
import pytest
from carets import raises_at

import flexdsl
from flexdsl import parse, unparse
from flexdsl.errors import SpecSyntaxError
from flexdsl.grammar import MAX_DEPTH, parse_expression
from flexdsl.ir import (SCORE, Binary, Call, Compare, Const, IfElse, Lookup, Name, Num, Spec,
                        Unary)

q, kv, h, score = Name("q"), Name("kv"), Name("h"), Name(SCORE)


def expr(text):
    return parse_expression(text)


# -- the three forms of a spec ---------------------------------------------------------------

def test_mask_only_keeps_the_score():
    assert parse("where q >= kv") == Spec(score, Compare((q, kv), (">=",)))


def test_score_only_masks_nothing():
    assert parse("score * 2") == Spec(Binary("*", score, Num(2)), None)


def test_score_and_mask():
    spec = parse("score + slope[h] where q >= kv")
    assert spec.score == Binary("+", score, Lookup("slope", (h,)))
    assert spec.mask == Compare((q, kv), (">=",))
    assert spec.text == "score + slope[h] where q >= kv"


# -- every construct of the language ---------------------------------------------------------

@pytest.mark.parametrize("text, node", [
    ("7", Num(7)),
    ("2.5", Num(2.5)),
    (".5", Num(0.5)),
    ("3.", Num(3.0)),
    ("1e3", Num(1000.0)),
    ("2.5E-2", Num(0.025)),
    ("inf", Const("inf")),
    ("pi", Const("pi")),
    ("q_len", Name("q_len")),
    ("kv_len", Name("kv_len")),
    ("W", Name("W")),
    ("doc[q]", Lookup("doc", (q,))),
    ("bias[h, q - kv]", Lookup("bias", (h, Binary("-", q, kv)))),
    ("bias [ h , q ]", Lookup("bias", (h, q))),
    ("t[doc[q]]", Lookup("t", (Lookup("doc", (q,)),))),
    ("clamp(q, 0, W)", Call("clamp", (q, Num(0), Name("W")))),
    ("f()", Call("f", ())),
    ("abs (q)", Call("abs", (q,))),
    ("-q", Unary("-", q)),
    ("not q < kv", Unary("not", Compare((q, kv), ("<",)))),
    ("score if q >= kv else -inf",
     IfElse(score, Compare((q, kv), (">=",)), Unary("-", Const("inf")))),
])
def test_constructs(text, node):
    assert expr(text) == node


def test_numbers_keep_their_kind():
    assert type(expr("2").value) is int
    assert type(expr("2.0").value) is float
    assert type(expr("2e0").value) is float
    assert parse("where q // 2 == 1") != parse("where q // 2.0 == 1")
    assert hash(Num(2)) != hash(Num(2.0)) and Num(2) == Num(2) and Num(2.0) == Num(2.0)


@pytest.mark.parametrize("op", ["+", "-", "*", "/", "//", "%", "**", "and", "or"])
def test_binary_operators(op):
    assert expr(f"q {op} kv") == Binary(op, q, kv)


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
def test_comparisons(op):
    assert expr(f"q {op} kv") == Compare((q, kv), (op,))


def test_comparisons_chain():
    node = expr("0 <= q - kv < W")
    assert node == Compare((Num(0), Binary("-", q, kv), Name("W")), ("<=", "<"))


# -- precedence and associativity -------------------------------------------------------------

@pytest.mark.parametrize("text, node", [
    ("q + kv * h", Binary("+", q, Binary("*", kv, h))),
    ("q * kv + h", Binary("+", Binary("*", q, kv), h)),
    ("q - kv - h", Binary("-", Binary("-", q, kv), h)),
    ("q // kv % h", Binary("%", Binary("//", q, kv), h)),
    ("q ** kv ** h", Binary("**", q, Binary("**", kv, h))),
    ("-q ** 2", Unary("-", Binary("**", q, Num(2)))),
    ("q ** -2", Binary("**", q, Unary("-", Num(2)))),
    ("(-q) ** 2", Binary("**", Unary("-", q), Num(2))),
    ("--q", Unary("-", Unary("-", q))),
    ("q + kv < h", Compare((Binary("+", q, kv), h), ("<",))),
    ("q < kv and kv < h", Binary("and", Compare((q, kv), ("<",)), Compare((kv, h), ("<",)))),
    ("not q < kv and h", Binary("and", Unary("not", Compare((q, kv), ("<",))), h)),
    ("q or kv and h", Binary("or", q, Binary("and", kv, h))),
    ("q and kv or h", Binary("or", Binary("and", q, kv), h)),
    ("q or kv or h", Binary("or", Binary("or", q, kv), h)),
    ("q if kv else h if q else kv", IfElse(q, kv, IfElse(h, q, kv))),
    ("q or kv if h else q", IfElse(Binary("or", q, kv), h, q)),
    ("(q + kv) * h", Binary("*", Binary("+", q, kv), h)),
])
def test_precedence(text, node):
    assert expr(text) == node


# -- spans ------------------------------------------------------------------------------------

def test_spans_point_into_the_text():
    text = "score + bias[h, q - kv] where 0 <= q < W"
    spec = parse(text)
    lookup = spec.score.right
    assert text[slice(*lookup.span)] == "bias[h, q - kv]"
    assert text[slice(*lookup.name_span)] == "bias"
    assert text[slice(*lookup.indices[1].span)] == "q - kv"
    assert text[slice(*spec.score.op_span)] == "+"
    assert text[slice(*spec.mask.span)] == "0 <= q < W"
    assert text[slice(*spec.mask.operands[2].span)] == "W"


def test_spans_count_a_tab_as_one_character():
    text = "score\t+\tbias[\th]\twhere\tq >= kv"
    spec = parse(text)
    assert text[slice(*spec.score.right.span)] == "bias[\th]"
    assert text[slice(*spec.mask.span)] == "q >= kv"


def test_call_spans():
    text = "cap * tanh(score / cap)"
    call = parse(text).score.right
    assert text[slice(*call.span)] == "tanh(score / cap)"
    assert text[slice(*call.name_span)] == "tanh"


def test_spans_take_no_part_in_equality():
    assert parse("q+kv") == parse("  q  +  kv ")
    assert hash(parse("q+kv")) == hash(parse("q + kv"))
    assert parse("q+kv") != parse("kv+q")


# -- unparse ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, normal", [
    ("score+slope[h]*(kv-q) where q>=kv", "score + slope[h] * (kv - q) where q >= kv"),
    ("where q>=kv", "where q >= kv"),
    ("score where q>=kv", "where q >= kv"),
    ("((score))", "score"),
    ("q - (kv - h)", "q - (kv - h)"),
    ("(q - kv) - h", "q - kv - h"),
    ("(q ** kv) ** h", "(q ** kv) ** h"),
    ("-(q ** 2)", "-q ** 2"),
    ("(-q) ** 2", "(-q) ** 2"),
    ("-(q * kv)", "-(q * kv)"),
    ("q ** (-2)", "q ** -2"),
    ("not (q < kv or kv < h)", "not (q < kv or kv < h)"),
    ("(q < kv) == (kv < h)", "(q < kv) == (kv < h)"),
    ("(q if kv else h) if q else kv", "(q if kv else h) if q else kv"),
    ("q if kv else (h if q else kv)", "q if kv else h if q else kv"),
    ("1.", "1.0"), (".5", "0.5"), ("1e-5", "1e-05"), ("1E20", "1e+20"),
    ("bias[ h,q ]", "bias[h, q]"),
    ("clamp( q,0 , W )", "clamp(q, 0, W)"),
])
def test_unparse_normalises(text, normal):
    spec = parse(text)
    assert unparse(spec) == normal
    assert str(spec) == normal
    assert parse(normal) == spec
    assert unparse(parse(normal)) == normal


def test_unparse_refuses_what_is_not_a_node():
    with pytest.raises(TypeError):
        unparse("q")
    with pytest.raises(TypeError):
        unparse(Num(True))


# -- syntax errors beyond the catalogue of test_check ------------------------------------------

@pytest.mark.parametrize("text, message, column, hint", [
    ("score & q", "'&' is not an operator", 6, "'and'"),
    ("score && q", "'&&' is not an operator", 6, "'and'"),
    ("where q < kv || q", "'||' is not an operator", 13, "'or'"),
    ("score ^ 2", "'^' is not an operator", 6, "'**'"),
    ("where ~q", "'~' is not an operator", 6, "'not'"),
    ("a ? b : c", "'?' is not an operator", 2, "if"),
    ("where !(q < kv)", "'!' is not an operator", 6, "'not'"),
    ("score + {q}", "braces", 8, None),
    ("score + q$", "unexpected character '$'", 9, None),
    ("score + é", "unexpected character 'é'", 8, None),
    ("Where q >= kv", "unexpected 'Where'", 0, "lower case: 'where'"),
    ("where q >= kv AND q < 5", "unexpected 'AND'", 14, "lower case: 'and'"),
    ("where Not q > kv", "unexpected 'Not'", 6, "lower case: 'not'"),
    ("score + 2q", "unexpected 'q'", 9, "operator missing"),
    ("score where q >= kv where q", "unexpected 'where'", 20, "'where' comes once"),
    ("score +* 2", "expected an operand, found '*'", 7, None),
    ("score + ", "ends too soon", 7, "complete"),
    ("where q >= kv and", "ends too soon", 17, "complete"),
    ("where", "ends too soon", 5, None),
    ("score + 1e999", "too large for a float", 8, "'inf'"),
    ("where q < 99999999999999999999", "does not fit in 64 bits", 10, None),
    ("where q < 1" + "0" * 5000, "does not fit in 64 bits", 10, None),
    ("where\tq\t=\tkv", "'=' is not a comparison", 8, None),
    ("where\tqq\t>=\tkv\tx", "unexpected 'x'", 15, None),
])
def test_syntax_errors(text, message, column, hint):
    error = raises_at(lambda: parse(text), message, column, kind=SpecSyntaxError)
    if hint:
        assert hint in error.hint


def test_largest_int64_is_accepted():
    assert parse("where q < 9223372036854775807").mask.operands[1] == Num(2 ** 63 - 1)
    assert parse("where q < 00000000000000000000000000012").mask.operands[1] == Num(12)


@pytest.mark.parametrize("text", [
    "(" * 400 + "q" + ")" * 400,
    "-" * 2000 + "score",
    "where " + "not " * 2000 + "q >= kv",
    "score" + " + q" * 1000,
    "where q >= kv" + " and q >= kv" * 1000,
])
def test_deep_nesting_is_a_spec_error(text):
    # Long chains parse, but every later stage walks the tree recursively: they are refused here.
    with pytest.raises(SpecSyntaxError, match="nested too deeply"):
        flexdsl.check(text)


def test_chains_just_under_the_depth_limit_work_end_to_end():
    text = "score" + " + q" * (MAX_DEPTH - 2)
    checked = flexdsl.check(text)
    assert parse(unparse(checked.spec)) == checked.spec


def test_multiline_specs_say_line_and_column():
    with pytest.raises(SpecSyntaxError) as info:
        parse("score\nwhere q = kv")
    assert "line 2, column 9:" in str(info.value)
    assert str(info.value).splitlines()[-2] == "          ^"


def test_a_spec_must_be_a_string():
    with pytest.raises(SpecSyntaxError, match="a spec is a string, not int"):
        parse(3)
