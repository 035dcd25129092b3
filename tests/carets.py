"""Reading a rendered SpecError back: where its carets stand, so tests can assert columns."""
from __future__ import annotations

import pytest

import flexdsl


def caret(error: flexdsl.SpecError) -> tuple[int, int]:
    """(column, width) of the carets in ``str(error)``, as 0-based columns into the spec line."""
    for line in str(error).splitlines():
        body = line.strip()
        if body and set(body) == {"^"}:
            return len(line) - len(line.lstrip()) - 2, len(body)  # rendered lines indent by 2
    raise AssertionError(f"no caret in:\n{error}")


def raises_at(call, message: str, column: int, width: int | None = None,
              kind: type = flexdsl.SpecError) -> flexdsl.SpecError:
    """Run ``call``; it must raise ``kind`` whose message holds ``message``, caret at ``column``.

    The rendered caret must agree with ``error.span``, and the spec must be printed above it.
    """
    with pytest.raises(kind) as info:
        call()
    error = info.value
    assert message in error.message, str(error)
    assert caret(error) == (column, width or caret(error)[1]), str(error)
    assert error.span is not None and error.span[0] == column, error.span
    if width is not None and error.span[1] > error.span[0]:
        assert error.span[1] - error.span[0] == width, error.span
    if "\n" not in error.spec:
        assert str(error).splitlines()[1] == "  " + error.spec.replace("\t", " "), str(error)
    return error
