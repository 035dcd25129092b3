"""Text -> IR. ``parse`` knows nothing of types or tensors; ``check`` judges what it builds.

Before pyparsing sees the text, a short scan catches what a grammar reports badly: characters
the language does not have, ``=`` where ``==`` was meant, and unbalanced brackets, each with the
caret under the true culprit.
"""
from __future__ import annotations

import re

import pyparsing as pp

from .. import ir
from ..errors import SpecSyntaxError

__all__ = ["parse", "parse_expression"]

_OPENERS = {"(": ")", "[": "]"}
_CLOSERS = {")": "(", "]": "["}
_ALLOWED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ \t\r\n"
               "+-*/%()[],.<>=!")
_FOREIGN_OPERATORS = {
    "&&": ("'&&' is not an operator", "write 'and'"),
    "||": ("'||' is not an operator", "write 'or'"),
    "&": ("'&' is not an operator", "write 'and' to combine conditions"),
    "|": ("'|' is not an operator", "write 'or' to combine conditions"),
    "^": ("'^' is not an operator", "write '**' for a power"),
    "~": ("'~' is not an operator", "write 'not' to negate a condition"),
    "?": ("'?' is not an operator", "write 'a if condition else b'"),
    ":": ("':' is not an operator", "write 'a if condition else b'"),
    "{": ("braces are not part of the language", "use ( ) to group and [ ] to index"),
    "}": ("braces are not part of the language", "use ( ) to group and [ ] to index"),
}


def parse(text: str) -> ir.Spec:
    """Parse a whole spec: ``score_expr [where mask]`` or ``where mask``.

    >>> parse("where q >= kv").mask
    Compare(operands=(Name(id='q'), Name(id='kv')), ops=('>=',))
    """
    from . import rules
    return _parse(text, rules.spec)


def parse_expression(text: str) -> ir.Expr:
    """Parse one expression (a named sub-expression of a config, say)."""
    from . import rules
    return _parse(text, rules.expression)


def _parse(text: str, rule: pp.ParserElement):
    if not isinstance(text, str):
        raise SpecSyntaxError(f"a spec is a string, not {type(text).__name__}")
    _scan(text)
    try:
        result = rule.parse_string(text, parse_all=True)[0]
    except pp.ParseBaseException as error:
        raise _syntax_error(text, error) from None
    except RecursionError:
        raise _too_deep(text) from None
    _judge_tree(text, (result.score, result.mask) if isinstance(result, ir.Spec) else (result,))
    return result


# Every later stage (check, unparse, sympy, lowering) walks the tree recursively; a long flat
# chain such as "q + q + ... + q" parses fine but would exhaust Python's stack there, so the
# depth is bounded here, once, where the caret can still point at the text.
MAX_DEPTH = 200
_INT64_MAX = 2 ** 63 - 1


def _too_deep(text: str) -> SpecSyntaxError:
    return SpecSyntaxError("the spec is nested too deeply", spec=text, span=(0, len(text)),
                           hint="split it into named sub-expressions")


def _judge_tree(text: str, roots) -> None:
    """Reject what parses but no stage can hold: too deep a tree, literals that overflow."""
    stack = [(root, 1) for root in roots if root is not None]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(text)
        if isinstance(node, ir.Num):
            _judge_number(text, node)
        stack.extend((child, depth + 1) for child in ir.children(node))


def _judge_number(text: str, node: ir.Num) -> None:
    if isinstance(node.value, float) and node.value == float("inf"):
        # float("1e999") is inf, which would unparse as the constant 'inf': say so instead.
        raise SpecSyntaxError("this number is too large for a float", spec=text,
                              span=node.span, hint="write 'inf' for infinity")
    if isinstance(node.value, int) and node.value > _INT64_MAX:
        raise SpecSyntaxError("this integer does not fit in 64 bits", spec=text,
                              span=node.span, hint=f"integers go up to {_INT64_MAX}")


def _scan(text: str) -> None:
    if not text.strip():
        raise SpecSyntaxError("the spec is empty", spec=text, span=(0, 0),
                              hint="write a score expression, a mask ('where q >= kv'), or both")
    stack: list[tuple[str, int]] = []
    i = 0
    while i < len(text):
        c = text[i]
        pair = text[i:i + 2]
        if pair in _FOREIGN_OPERATORS or c in _FOREIGN_OPERATORS:
            key = pair if pair in _FOREIGN_OPERATORS else c
            message, hint = _FOREIGN_OPERATORS[key]
            raise SpecSyntaxError(message, spec=text, span=(i, i + len(key)), hint=hint)
        if c not in _ALLOWED:
            raise SpecSyntaxError(f"unexpected character {c!r}", spec=text, span=(i, i + 1),
                                  hint="names are ASCII letters, digits and '_'; "
                                       "operators are + - * / // % ** == != < <= > >=")
        if c == "=" and text[i - 1:i] not in ("=", "!", "<", ">") and text[i + 1:i + 2] != "=":
            raise SpecSyntaxError("'=' is not a comparison", spec=text, span=(i, i + 1),
                                  hint="write '==' to compare for equality")
        if c == "!" and text[i + 1:i + 2] != "=":
            raise SpecSyntaxError("'!' is not an operator", spec=text, span=(i, i + 1),
                                  hint="write 'not' to negate a condition, '!=' for 'not equal'")
        if c in _OPENERS:
            stack.append((c, i))
        elif c in _CLOSERS:
            if not stack:
                raise SpecSyntaxError(f"unmatched {c!r}", spec=text, span=(i, i + 1),
                                      hint=f"remove it, or add the {_CLOSERS[c]!r} it closes")
            opener, at = stack.pop()
            if opener != _CLOSERS[c]:
                raise SpecSyntaxError(
                    f"{c!r} closes the {opener!r} at column {at + 1}", spec=text,
                    span=(i, i + 1), hint=f"close it with {_OPENERS[opener]!r}")
        i += 1
    if stack:
        opener, at = stack[-1]
        raise SpecSyntaxError(f"{opener!r} is never closed", spec=text, span=(at, at + 1),
                              hint=f"add {_OPENERS[opener]!r} where the group ends")


def _syntax_error(text: str, error: pp.ParseBaseException) -> SpecSyntaxError:
    loc = min(error.loc, len(text))
    rest = text[loc:]
    stripped = rest.lstrip()
    loc += len(rest) - len(stripped)
    if not stripped:
        expected = _expected(error)
        return SpecSyntaxError(f"the spec ends too soon: expected {expected}", spec=text,
                               span=(len(text.rstrip()), len(text.rstrip()) + 1),
                               hint="complete the expression")
    token = _token_at(stripped)
    span = (loc, loc + len(token))
    before = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", text[:loc])
    if before and before.group(1).lower() in ir.KEYWORDS and before.group(1) not in ir.KEYWORDS:
        # "Where q >= kv" parses 'Where' as a name and fails at 'q': the culprit is 'Where'.
        token, span = before.group(1), before.span(1)
    word = token.lower()
    if word in ir.KEYWORDS and token != word:
        return SpecSyntaxError(f"unexpected {token!r}", spec=text, span=span,
                               hint=f"keywords are lower case: {word!r}")
    if isinstance(error, pp.ParseSyntaxException) or "end of text" not in str(error):
        expected = _expected(error)
        hint = "an operand is missing or misplaced"
        if token == "where":
            hint = "'where' comes once, between the score expression and the mask"
        elif token in (")", "]", ","):
            hint = f"an operand is missing before {token!r}"
        return SpecSyntaxError(f"expected {expected}, found {token!r}", spec=text, span=span,
                               hint=hint)
    hint = "is an operator missing? e.g. '2 * q', not '2q'"
    if token == "where":
        hint = "'where' comes once, between the score expression and the mask"
    elif token in ("if", "else"):
        hint = "a conditional reads 'a if condition else b'"
    return SpecSyntaxError(f"unexpected {token!r}", spec=text, span=span, hint=hint)


def _expected(error: pp.ParseBaseException) -> str:
    element = getattr(error, "parser_element", None)
    name = getattr(element, "customName", None) or getattr(element, "name", None)
    if not name or name.startswith(("{", "Re:", "W:", "'{")) or len(name) > 40:
        return "an operand"
    return name


def _token_at(text: str) -> str:
    """The token that ``text`` starts with, for messages."""
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\*\*|//|[<>=!]=|\S",
                     text)
    return match.group(0) if match else text[:1]
