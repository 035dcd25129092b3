"""pyparsing rules for the spec language; parse actions build IR nodes with source spans.

The BNF is in docs/grammar.md. The rules are deliberately permissive about names (anything that
looks like an identifier may be indexed or called): the checker, which has spans, judges them.
Binary operators use pyparsing's error stop (``-``): once an operator has been read, a missing
operand is reported where it is missing instead of at some earlier alternative.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyparsing as pp

from .. import ir

# The cache lives for one parse_string call; bounding it (pyparsing's default, 128 entries)
# only makes longer specs re-parse what they already parsed.
pp.ParserElement.enable_packrat(cache_size_limit=None)


@dataclass(frozen=True)
class _Op:
    """An operator token and where it stands; it never leaves this module."""
    text: str
    span: ir.Span


def _op(expression: pp.ParserElement, name: str) -> pp.ParserElement:
    def action(s, loc, toks):
        return _Op(toks[0], (loc, loc + len(toks[0])))
    return expression.copy().set_name(name).add_parse_action(action)


def _keyword(word: str) -> pp.ParserElement:
    return _op(pp.Keyword(word), f"'{word}'")


_KEYWORD_PATTERN = "|".join(ir.KEYWORDS)
IDENTIFIER = pp.Regex(rf"(?!(?:{_KEYWORD_PATTERN})\b)[A-Za-z_][A-Za-z0-9_]*").set_name("a name")
NUMBER = pp.Regex(r"(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+").set_name("a number")

LPAREN, RPAREN = _op(pp.Literal("("), "'('"), _op(pp.Literal(")"), "')'")
LBRACKET, RBRACKET = _op(pp.Literal("["), "'['"), _op(pp.Literal("]"), "']'")
COMMA = pp.Suppress(",")
POWER_OP = _op(pp.Literal("**"), "'**'")
MUL_OP = _op(pp.Regex(r"//|/|%|\*(?!\*)"), "'*', '/', '//' or '%'")
ADD_OP = _op(pp.Regex(r"[+-]"), "'+' or '-'")
NEG_OP = _op(pp.Literal("-"), "'-'")
CMP_OP = _op(pp.Regex(r"==|!=|<=|>=|<|>"), "a comparison")
NOT, AND, OR, IF, ELSE, WHERE = (_keyword(w) for w in ("not", "and", "or", "if", "else", "where"))


def _name_action(s, loc, toks):
    text = toks[0]
    span = (loc, loc + len(text))
    if text in ir.CONSTANTS:
        return ir.Const(text, span=span)
    return ir.Name(text, span=span)


def _number_action(s, loc, toks):
    text = toks[0]
    span = (loc, loc + len(text))
    if any(c in text for c in ".eE"):
        return ir.Num(float(text), span=span)
    if len(text.lstrip("0")) > 19:
        # Past 64 bits anyway (and past 4300 digits int() refuses): the parser rejects it.
        return ir.Num(2 ** 63, span=span)
    return ir.Num(int(text), span=span)


def _application(node_type):
    """``name(args)`` or ``name[args]`` -> Call or Lookup, spanning name to closing bracket."""
    def action(s, loc, toks):
        name, _open, *args, close = toks
        span = (loc, close.span[1])
        name_span = (loc, loc + len(name))
        return node_type(name, tuple(args), span=span, name_span=name_span)
    return action


def _span(node) -> ir.Span:
    return node.span


def _fold_left(s, loc, toks):
    node = toks[0]
    for i in range(1, len(toks), 2):
        op, right = toks[i], toks[i + 1]
        node = ir.Binary(op.text, node, right, span=(_span(node)[0], _span(right)[1]),
                         op_span=op.span)
    return node


def _fold_connective(s, loc, toks):
    return _fold_left(s, loc, toks)


def _power(s, loc, toks):
    if len(toks) == 1:
        return toks[0]
    base, op, exponent = toks
    return ir.Binary("**", base, exponent, span=(base.span[0], exponent.span[1]), op_span=op.span)


def _prefix(s, loc, toks):
    if len(toks) == 1:
        return toks[0]
    op, operand = toks
    return ir.Unary(op.text, operand, span=(op.span[0], operand.span[1]))


def _compare(s, loc, toks):
    if len(toks) == 1:
        return toks[0]
    operands = tuple(toks[0::2])
    ops = tuple(op.text for op in toks[1::2])
    return ir.Compare(operands, ops, span=(operands[0].span[0], operands[-1].span[1]))


def _if_else(s, loc, toks):
    if len(toks) == 1:
        return toks[0]
    then, _if, test, _else, orelse = toks
    return ir.IfElse(then, test, orelse, span=(then.span[0], orelse.span[1]))


def _parenthesised(s, loc, toks):
    return toks[1]


expression = pp.Forward().set_name("an expression")
arguments = pp.Optional(expression + pp.ZeroOrMore(COMMA - expression))
indices = expression + pp.ZeroOrMore(COMMA - expression)

call = (IDENTIFIER + LPAREN - arguments - RPAREN).set_name("a call").add_parse_action(
    _application(ir.Call))
lookup = (IDENTIFIER + LBRACKET - indices - RBRACKET).set_name("a lookup").add_parse_action(
    _application(ir.Lookup))
name = IDENTIFIER.copy().add_parse_action(_name_action)
number = NUMBER.copy().add_parse_action(_number_action)
group = (LPAREN - expression - RPAREN).add_parse_action(_parenthesised)
atom = (number | call | lookup | name | group).set_name("an operand")

unary = pp.Forward().set_name("an operand")
power = (atom + pp.Optional(POWER_OP - unary)).add_parse_action(_power)
unary <<= ((NEG_OP - unary) | power).add_parse_action(_prefix)
term = (unary + pp.ZeroOrMore(MUL_OP - unary)).add_parse_action(_fold_left)
arithmetic = (term + pp.ZeroOrMore(ADD_OP - term)).add_parse_action(_fold_left)
comparison = (arithmetic + pp.ZeroOrMore(CMP_OP - arithmetic)).add_parse_action(_compare)
negation = pp.Forward().set_name("a condition")
negation <<= ((NOT - negation) | comparison).add_parse_action(_prefix)
conjunction = (negation + pp.ZeroOrMore(AND - negation)).add_parse_action(_fold_connective)
disjunction = (conjunction + pp.ZeroOrMore(OR - conjunction)).add_parse_action(_fold_connective)
expression <<= (disjunction + pp.Optional(IF - disjunction - ELSE - expression)
                ).add_parse_action(_if_else)


def _spec(s, loc, toks):
    if isinstance(toks[0], _Op):  # "where mask": the score is left as it is
        return ir.Spec(ir.Name(ir.SCORE), toks[1], text=s)
    if len(toks) == 1:
        return ir.Spec(toks[0], None, text=s)
    return ir.Spec(toks[0], toks[2], text=s)


spec = ((WHERE - expression) | (expression + pp.Optional(WHERE - expression))
        ).add_parse_action(_spec).set_name("a spec")

# pyparsing expands tabs to spaces before parsing unless told not to, which would shift every
# span after a tab away from the user's text.
spec.parse_with_tabs()
expression.parse_with_tabs()
