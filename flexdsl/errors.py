"""The one error family of flexdsl.

Every failure a user can cause is a :class:`SpecError`: it carries the spec text, the span at
fault and a hint, and renders them as::

    unknown name 'x'
      score + slope[x] where q >= kv
                    ^
    hint: positions are b, h, q and kv; did you mean 'h'?

This module sits at the bottom of the import graph so that every stage can raise it.
"""
from __future__ import annotations


class SpecError(ValueError):
    """A spec, a config or a call that flexdsl cannot accept.

    ``span`` is a ``(start, end)`` pair of character offsets into ``spec``; ``origin`` names where
    the spec came from (``"model.toml:12"``) so that config errors point at the file and line.
    """

    def __init__(self, message: str, *, spec: str | None = None,
                 span: tuple[int, int] | None = None, hint: str | None = None,
                 origin: str | None = None):
        self.message = message
        self.spec = spec
        self.span = span
        self.hint = hint
        self.origin = origin
        super().__init__(message)

    def with_spec(self, spec: str, origin: str | None = None) -> "SpecError":
        """The same error, attached to ``spec`` if it had none (stages deep down may not know it)."""
        if self.spec is None:
            self.spec = spec
        if origin is not None and self.origin is None:
            self.origin = origin
        return self

    def __str__(self) -> str:
        lines = [self.message]
        if self.origin:
            lines[0] = f"{self.origin}: {self.message}"
        if self.spec is not None:
            lines.extend(_excerpt(self.spec, self.span))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class SpecSyntaxError(SpecError):
    """The text is not a spec: a bad character, an unbalanced bracket, a missing operand."""


class SpecTypeError(SpecError):
    """The spec parses but means nothing: unknown names, wrong types, wrong arities."""


class SpecCallError(SpecError):
    """The spec is fine but a call gave it the wrong tensors, shapes or parameters."""


def _excerpt(spec: str, span: tuple[int, int] | None) -> list[str]:
    """The line of ``spec`` holding ``span`` with carets under it, indented by two spaces."""
    if span is None:
        return ["  " + line for line in spec.splitlines() or [""]]
    start, end = span
    start = max(0, min(start, len(spec)))
    end = max(start + 1, min(end, len(spec)))
    line_start = spec.rfind("\n", 0, start) + 1
    line_end = spec.find("\n", start)
    if line_end == -1:
        line_end = len(spec)
    line = spec[line_start:line_end]
    column = start - line_start
    width = max(1, min(end, line_end) - start)
    # Tabs would shift the caret; show them as single spaces.
    line = line.replace("\t", " ")
    out = []
    if spec.count("\n"):
        row = spec.count("\n", 0, line_start) + 1
        out.append(f"  line {row}, column {column + 1}:")
    out.append("  " + line)
    out.append("  " + " " * column + "^" * width)
    return out
