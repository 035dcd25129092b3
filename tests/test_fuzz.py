"""Fuzzing parse and check (issue 2, items 4 and 5).

More than 10,000 inputs in all: random characters, random token soup, valid specs drawn from a
grammar-aware strategy, and those specs mutated by deleting, inserting and swapping characters
and tokens. Whatever the input, nothing but a SpecError may come out, no input may take long,
and whatever parses must survive the round trip ``parse(unparse(parse(s))) == parse(s)``.

The strategy for valid specs builds typed text: int expressions, float expressions and
conditions, with names whose types never clash, so every spec it draws must also check. Each
fragment knows its precedence level and is parenthesised as the grammar needs (and sometimes for
no reason), so the text means exactly the tree that was drawn.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexdsl
from flexdsl import parse, unparse

FED: dict[str, int] = {}  # inputs fed to parse and check, per test
SETTINGS = dict(deadline=2000, database=None,  # deadline in ms, per example
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    pass


@contextmanager
def no_hang(seconds: float = 10.0):
    """Hypothesis's deadline is judged after an example returns; this stops one that never does."""
    def alarm(signum, frame):
        raise Hang(f"no answer in {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def feed(test: str, text: str):
    """Parse and check ``text``: the checked spec and the tree of its normalised text, or None
    for a SpecError; nothing else may come out."""
    FED[test] = FED.get(test, 0) + 1
    with no_hang():
        try:
            spec = parse(text)
        except flexdsl.SpecError as error:
            assert_renders(error, text)
            return None
        again = assert_round_trip(spec)
        try:
            return flexdsl.check(spec), again
        except flexdsl.SpecError as error:
            assert_renders(error, text)
            return None


def assert_renders(error: flexdsl.SpecError, text: str) -> None:
    rendered = str(error)
    assert rendered.startswith(error.message)
    if error.span is not None:
        assert 0 <= error.span[0] <= len(text), (error.span, text)
        assert "^" in rendered


def assert_round_trip(spec: flexdsl.ir.Spec) -> flexdsl.ir.Spec:
    normal = unparse(spec)
    again = parse(normal)
    assert again == spec, (spec.text, normal)
    assert unparse(again) == normal, (spec.text, normal)  # also keeps 2 and 2.0 apart
    return again


parse("where q >= kv")  # build the parser before any deadline counts


# ---------------------------------------------------------------------------------------------
# Valid specs, drawn by plain functions of a random generator that hypothesis drives (and
# shrinks). Levels follow the grammar, loosest first.

COND, OR, AND, NOT, CMP, ADD, MUL, NEG, POW, ATOM = range(1, 11)
INT_PARAMS = ("W", "P", "Cw")
FLOAT_PARAMS = ("cap", "alpha")
INT_TENSORS = {"doc": 1, "seg": 2}
FLOAT_TENSORS = {"slope": 1, "bias": 2}
FLOAT_FUNCTIONS = ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "tanh", "sigmoid")
FLOAT_TEXTS = ("0.5", ".25", "3.", "1e-3", "2.5E+2", "1e20", "0.0", "5e-324", "1.7976931348623157e308")
DEPTH = 2


class Frag:
    """Tokens of an expression and the precedence level of its outermost operator."""

    def __init__(self, tokens: list[str], level: int):
        self.tokens, self.level = tokens, level


def atom(*tokens: str) -> Frag:
    return Frag(list(tokens), ATOM)


def operand(rng, frag: Frag, minimum: int) -> list[str]:
    """``frag`` as an operand that needs at least ``minimum``: in parentheses if it must be,
    and now and then for no reason."""
    if frag.level < minimum or rng.randrange(10) == 0:
        return ["(", *frag.tokens, ")"]
    return frag.tokens


def binary(rng, op: str, level: int, left: Frag, right: Frag) -> Frag:
    if op == "**":  # right-associative, and its base binds tighter than unary minus
        return Frag([*operand(rng, left, ATOM), op, *operand(rng, right, NEG)], POW)
    return Frag([*operand(rng, left, level), op, *operand(rng, right, level + 1)], level)


def applied(rng, name: str, args: list[Frag], brackets: str = "()") -> Frag:
    """``name(args)`` or, with brackets "[]", ``name[args]``."""
    tokens = [name, brackets[0]]
    for i, arg in enumerate(args):
        tokens += ([","] if i else []) + operand(rng, arg, COND)
    return atom(*tokens, brackets[1])


def lookup(rng, tensors: dict[str, int]) -> Frag:
    name = rng.choice(sorted(tensors))
    return applied(rng, name, [int_expr(rng, 1, closed=False) for _ in range(tensors[name])],
                   "[]")


def if_else(rng, then: Frag, test: Frag, orelse: Frag) -> Frag:
    return Frag([*operand(rng, then, OR), "if", *operand(rng, test, OR), "else",
                 *operand(rng, orelse, COND)], COND)


def minmax(rng, first: Frag, more) -> Frag:
    name = rng.choice(["abs", "min", "max", "clamp"])
    n = {"abs": 1, "clamp": 3}.get(name) or rng.randint(2, 3)
    return applied(rng, name, [first] + [more() for _ in range(n - 1)])


def int_literal(rng) -> str:
    return str(rng.choice([rng.randrange(300), rng.randrange(2 ** 63)]))


def float_literal(rng) -> str:
    return rng.choice([repr(rng.uniform(0, 1e6)), rng.choice(FLOAT_TEXTS)])


def int_expr(rng, depth: int = DEPTH, closed: bool = True) -> Frag:
    """An int expression. ``closed`` ones hold no parameters or tensors, so they may meet
    floats without making an int parameter float in one place and an index in another."""
    if depth <= 0 or rng.randrange(3) == 0:
        kind = rng.randrange(4 if closed or depth <= 0 else 5)
        if kind == 0:
            return atom(int_literal(rng))
        if kind == 1 and not closed:
            return atom(rng.choice(INT_PARAMS))
        if kind == 4:
            return lookup(rng, INT_TENSORS)
        return atom(rng.choice(["q", "kv", "h", "b", "q_len", "kv_len"]))
    sub = lambda: int_expr(rng, depth - 1, closed)  # noqa: E731
    kind = rng.randrange(7)
    if kind == 0:
        return binary(rng, rng.choice("+-"), ADD, sub(), sub())
    if kind == 1:
        return binary(rng, rng.choice(["*", "//", "%"]), MUL, sub(), sub())
    if kind == 2:
        return Frag(["-", *operand(rng, sub(), NEG)], NEG)
    if kind == 3:
        return minmax(rng, sub(), sub)
    if kind == 4:
        return if_else(rng, sub(), condition(rng, depth - 1), sub())
    if kind == 5:
        return applied(rng, rng.choice(["floor", "ceil"]), [float_expr(rng, depth - 1, False)])
    return binary(rng, "**", POW, sub(), atom(rng.choice("0123")))


def float_expr(rng, depth: int = DEPTH, in_score: bool = True) -> Frag:
    """A float expression; ``score`` may appear in the score part only, never in the mask."""
    if depth <= 0 or rng.randrange(3) == 0:
        kind = rng.randrange(4 if depth > 0 else 3)
        if kind == 0:
            return atom(float_literal(rng))
        if kind == 1:
            return atom(rng.choice(["inf", "pi", *FLOAT_PARAMS]))
        if kind == 3:
            return lookup(rng, FLOAT_TENSORS)
        return atom("score" if in_score else rng.choice(FLOAT_PARAMS))
    sub = lambda: float_expr(rng, depth - 1, in_score)  # noqa: E731

    def mixed():  # a float, or an int that holds no parameter
        return sub() if rng.randrange(2) else int_expr(rng, depth - 1, closed=True)

    def pair():
        both = [sub(), mixed()]
        return both if rng.randrange(2) else both[::-1]

    kind = rng.randrange(7)
    if kind == 0:
        return binary(rng, rng.choice("+-"), ADD, *pair())
    if kind == 1:
        return binary(rng, rng.choice("*/"), MUL, *pair())
    if kind == 2:
        return Frag(["-", *operand(rng, sub(), NEG)], NEG)
    if kind == 3:
        return applied(rng, rng.choice(FLOAT_FUNCTIONS), [mixed()])
    if kind == 4:
        return minmax(rng, sub(), mixed)
    if kind == 5:
        return if_else(rng, sub(), condition(rng, depth - 1, in_score), mixed())
    return binary(rng, "**", POW, sub(), mixed())


def condition(rng, depth: int = DEPTH, in_score: bool = False) -> Frag:
    if depth <= 0 or rng.randrange(3) == 0:
        # A chain compares ints with ints or floats with floats, so an int parameter is never
        # tied to a float one.
        ints = rng.randrange(2)
        side = lambda: (int_expr(rng, depth - 1, closed=False) if ints  # noqa: E731
                        else float_expr(rng, depth - 1, in_score))
        tokens = operand(rng, side(), ADD)
        for _ in range(rng.randint(1, 2)):
            op = rng.choice(["==", "!=", "<", "<=", ">", ">="])
            tokens += [op, *operand(rng, side(), ADD)]
        return Frag(tokens, CMP)
    sub = lambda: condition(rng, depth - 1, in_score)  # noqa: E731
    kind = rng.randrange(4)
    if kind == 0:
        return binary(rng, "and", AND, sub(), sub())
    if kind == 1:
        return binary(rng, "or", OR, sub(), sub())
    if kind == 2:
        return Frag(["not", *operand(rng, sub(), NOT)], NOT)
    return if_else(rng, sub(), sub(), sub())


def spec_tokens(rng, depth: int = DEPTH) -> list[str]:
    form = rng.choice(["score", "mask", "both"])
    tokens = []
    if form != "mask":
        tokens += float_expr(rng, depth).tokens
    if form != "score":
        tokens += ["where", *condition(rng, depth).tokens]
    return tokens


WORDY = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def joined(rng, tokens: list[str]) -> str:
    """Tokens as text, with random spacing (tabs and newlines too) where the grammar allows."""
    text = ""
    for token in tokens:
        gap = rng.choice(["", " ", " ", "  ", "\t", "\n"])
        if text and text[-1] in WORDY and token[0] in WORDY and not gap:
            gap = " "
        text += (gap if text else "") + token
    return text


RNG = st.randoms(use_true_random=False)
# Mutants are many and need no shrinking to be understood (a failure prints the text), so
# they draw from a seeded generator: a tenth of the cost of one hypothesis draw per choice.
FAST_RNG = st.randoms(use_true_random=True)


@st.composite
def valid_specs(draw, depth: int = DEPTH) -> tuple[list[str], str]:
    rng = draw(RNG)
    tokens = spec_tokens(rng, depth)
    return tokens, joined(rng, tokens)


def valid_spec(rng, depth: int = DEPTH) -> tuple[list[str], str]:
    tokens = spec_tokens(rng, depth)
    return tokens, joined(rng, tokens)


# ---------------------------------------------------------------------------------------------

@settings(max_examples=600, **SETTINGS)
@given(valid_specs())
def test_valid_specs_check_and_round_trip(drawn):
    _, text = drawn
    fed = feed("valid", text)
    if fed is None:
        # The strategy draws only well-typed specs, but a divisor of literals alone that comes
        # to 0 (`x // (0)`, `x / 0.0`) is refused since the checker folds constants.
        with pytest.raises(flexdsl.SpecTypeError, match="division by zero|negative power"):
            flexdsl.check(text)
        return
    checked, again = fed
    assert flexdsl.check(again).signature == checked.signature


JUNK = "=!&|^~?:{}$#@'\"\\`é→\x00\x7f"
ALPHABET = sorted(set("abcdefghiklmnopqrstuvwxyzWPC_0123456789 \t\n+-*/%()[],.<>=!") | set(JUNK))
VOCAB = ["score", "q", "kv", "h", "b", "q_len", "kv_len", "W", "cap", "doc", "bias", "x",
         "where", "and", "or", "not", "if", "else", "Where", "AND", "inf", "pi", "abs", "exp",
         "min", "clamp", "0", "1", "2.5", ".5", "1e3", "1e999", "+", "-", "*", "/", "//", "%",
         "**", "==", "!=", "<", "<=", ">", ">=", "=", "!", "(", ")", "[", "]", ",", "&&", "?"]


@st.composite
def mutated(draw) -> str:
    """A valid spec with 1 to 4 edits, on characters or on whole tokens."""
    rng = draw(FAST_RNG)
    tokens, text = valid_spec(rng, depth=rng.randint(1, 2))
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        if kind < 4:  # character edits: delete, insert, swap with the next, replace
            i = rng.randrange(max(len(text), 1))
            c = rng.choice(ALPHABET)
            text = [text[:i] + text[i + 1:], text[:i] + c + text[i:],
                    text[:i] + text[i + 1:i + 2] + text[i:i + 1] + text[i + 2:],
                    text[:i] + c + text[i + 1:]][kind]
            continue
        # token edits: delete, insert from the vocabulary, swap two, duplicate one
        tokens = list(tokens)
        i, j = rng.randrange(max(len(tokens), 1)), rng.randrange(max(len(tokens), 1))
        if kind == 4 and tokens:
            del tokens[i]
        elif kind == 5:
            tokens.insert(i, rng.choice(VOCAB))
        elif kind == 6 and tokens:
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif tokens:
            tokens.insert(i, tokens[j])
        text = joined(rng, tokens)
    return text


@settings(max_examples=4000, **SETTINGS)
@given(mutated())
def test_mutated_specs_give_spec_errors_only(text):
    feed("mutated", text)


@settings(max_examples=4000, **SETTINGS)
@given(st.text(st.sampled_from(ALPHABET), max_size=60) | st.text(max_size=30))
def test_random_text_gives_spec_errors_only(text):
    feed("text", text)


@settings(max_examples=2000, **SETTINGS)
@given(st.lists(st.sampled_from(VOCAB), max_size=25), RNG)
def test_random_token_soup_gives_spec_errors_only(tokens, rng):
    feed("tokens", joined(rng, tokens))


def test_at_least_ten_thousand_inputs_were_fed():
    if len(FED) < 4:
        pytest.skip("only meaningful after the whole module ran")
    assert sum(FED.values()) >= 10_000, FED


@pytest.mark.parametrize("text", [
    "(" * 5000, ")" * 5000, "[" * 300 + "q", "q" + "]" * 300, "not " * 5000,
    "-" * 5000, "score" + " +" * 3000, "where " + "q < " * 500 + "kv",
    "a" * 100_000, "1" * 5000, "score + 1" + "0" * 400, "score + 1e" + "9" * 400,
    "score + " + "1." + "5" * 5000, "where " + " and ".join(["q >= kv"] * 1000),
])
def test_pathological_inputs_answer_quickly(text):
    feed("pathological", text)
