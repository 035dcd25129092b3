"""Specs from files and config tables: the catalogue's TOML files, or a table inside a user's
TOML, YAML or JSON config (selected by a dotted key), or a plain dict.

A spec table reads::

    name = "packed documents"              # optional: name, description, source
    spec = "where same_doc and causal"     # required
    self_attention = true                  # optional: q and kv index one sequence

    [let]                                  # optional: named sub-expressions, in order
    causal = "q >= kv"
    same_doc = "doc[q] == doc[kv]"

    [params]                               # default parameters
    [tensors.doc]                          # how to make an example tensor
    kind = "documents"
    count = 4

The spec string may also open with ``let NAME = EXPRESSION`` lines. A later let and the spec
may use any earlier let; the substitution happens on the syntax tree, so ``let near = q - kv``
used as ``near * 2`` means ``(q - kv) * 2``. Every error points at the file, the line and the
column: ``model.toml:12:31: unknown name 'x'``, with the file's line and a caret.

torch is imported only to build example tensors.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import typing
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from . import ir
from .check import FLOAT, FUNCTIONS, INT, CheckedSpec, check
from .errors import SpecError, SpecSyntaxError, SpecTypeError
from .grammar import parse, parse_expression

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["SpecFile", "TensorRecipe", "example_tensors", "load", "looks_like_path", "read",
           "read_spec_file", "substitute", "TENSOR_KINDS"]

Keys = tuple  # a path of keys (str) and list indices (int) from the document's root


@dataclass(frozen=True)
class TensorRecipe:
    """How to make an example tensor: a ``kind`` and its options (sizes may be expressions in
    batch, heads, q_len, kv_len and the parameters)."""
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    learnable: bool = False
    # The names its sizes read; without q_len, kv_len or batch it is model state, not data.
    reads: frozenset[str] = frozenset()
    origin: str | None = None

    @property
    def per_call(self) -> bool:
        """Whether its sizes follow the call (lengths, batch): data rather than model state."""
        return bool(self.reads & _PER_CALL)


@dataclass(frozen=True)
class SpecFile:
    """A spec with its metadata, default parameters and example-tensor recipes.

    ``spec`` is the text to compile: the spec as written, or, when it uses lets, the spec
    with every let substituted (lets holds them as written). ``checked`` is that text checked.
    """
    spec: str
    name: str = ""
    description: str = ""
    source: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorRecipe] = field(default_factory=dict)
    origin: str | None = None
    lets: dict[str, str] = field(default_factory=dict)
    self_attention: bool = False
    checked: CheckedSpec | None = field(default=None, compare=False, repr=False)


# ----------------------------------------------------------------------------------------------
# Entry points

_EXTENSIONS = (".toml", ".json", ".yaml", ".yml")


def looks_like_path(text: str) -> bool:
    """Whether a command-line argument names a file (``model.yaml#model.attention`` included)
    rather than a spec: spec strings never hold '#' and never end in a file extension."""
    path, _ = _split_key(text)
    return path.endswith(_EXTENSIONS) or os.path.isfile(path)


def read_spec_file(path: str) -> SpecFile:
    """Read a spec file; ``PATH#KEY`` selects a table inside a larger config."""
    path, key = _split_key(os.fspath(path))
    return read(path, key)


def read(source: Union[str, os.PathLike, Mapping], key: str | None = None) -> SpecFile:
    """A spec table from a file (TOML, YAML or JSON), a dict, or a spec string, checked.

    ``key`` selects a table inside the file or dict: ``"model.attention"``, or
    ``"model.layers.0.attention"`` through a list.

    >>> f = read({"let": {"causal": "q >= kv"}, "spec": "where causal and q - kv < W",
    ...           "params": {"W": 128}})
    >>> f.spec, f.params
    ('where q >= kv and q - kv < W', {'W': 128})
    """
    document = _Document.open(source)
    keys = document.select(key)
    return _read_table(document, keys)


def load(source: Union[str, os.PathLike, Mapping], key: str | None = None,
         **params_and_tensors):
    """A spec file or config table compiled to a :class:`flexdsl.Attention`; the table's
    parameters are its defaults, and ``params_and_tensors`` add to or override them.

    >>> attn = load({"spec": "where 0 <= q - kv < W", "params": {"W": 64}})
    >>> dict(attn.defaults)
    {'W': 64}
    """
    from .api import compile  # api re-exports load; importing it here avoids a cycle
    spec_file = read(source, key)
    return compile(spec_file.spec, **{**spec_file.params, **params_and_tensors})


def _split_key(text: str) -> tuple[str, str | None]:
    path, sep, key = text.partition("#")
    return (path, key) if sep and key else (text, None)


# ----------------------------------------------------------------------------------------------
# Documents: the parsed data, and where each value stands in the file's text

@dataclass(frozen=True)
class _Place:
    line: int     # 1-based
    column: int   # 0-based
    text: str     # the whole line of the file


class _Document:
    """Parsed data with the (start, end) offsets of every value in the file it came from."""

    def __init__(self, data: Any, text: str | None = None, path: str | None = None,
                 regions: dict[Keys, tuple[int, int]] | None = None):
        self.data = data
        self.text = text
        self.path = path
        self.regions = regions or {}

    @classmethod
    def open(cls, source) -> "_Document":
        if isinstance(source, Mapping):
            return cls(source)
        if not isinstance(source, (str, os.PathLike)):
            raise SpecError(f"expected a path, a dict or a spec string, got "
                            f"{type(source).__name__}")
        source = os.fspath(source)
        if not looks_like_path(source):
            return cls({"spec": source})
        try:
            # utf-8-sig: an editor's byte-order mark is not part of the first key.
            with open(source, encoding="utf-8-sig") as f:
                text = f.read()
        except FileNotFoundError:
            raise SpecError(f"no such spec file: {source}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise SpecError(f"cannot read {source}: {error}") from None
        kind = os.path.splitext(source)[1].lower()
        reader = {".json": _read_json, ".yaml": _read_yaml, ".yml": _read_yaml}.get(
            kind, _read_toml)
        data, regions = reader(text, source)
        return cls(data, text, source, regions)

    def select(self, key: str | None) -> Keys:
        keys: Keys = ()
        if not key:
            return keys
        value = self.data
        for part in key.split("."):
            if isinstance(value, list) and part.isdigit() and int(part) < len(value):
                keys, value = (*keys, int(part)), value[int(part)]
            elif isinstance(value, Mapping) and part in value:
                keys, value = (*keys, part), value[part]
            else:
                where = self.describe(keys) or "the top level"
                found = (", ".join(map(str, value)) if isinstance(value, Mapping)
                         else f"a {type(value).__name__}")
                close = (difflib.get_close_matches(part, list(map(str, value)), n=1)
                         if isinstance(value, Mapping) else [])
                hint = f"did you mean '{close[0]}'?" if close else f"{where} holds: {found}"
                raise self.error(SpecError, f"no entry '{part}' in {where} (looking for "
                                            f"'{key}')", keys, hint=hint)
        return keys

    def get(self, keys: Keys) -> Any:
        value = self.data
        for k in keys:
            value = value[k]
        return value

    def describe(self, keys: Keys) -> str:
        return ".".join(map(str, keys))

    def place(self, keys: Keys, value: str | None = None, offset: int = 0) -> _Place | None:
        """Where character ``offset`` of the string ``value`` at ``keys`` stands in the file.

        Each line of the string is looked for in the value's stretch of the file, in order,
        so escapes and quoting of other lines do not matter; a line not found verbatim (an
        escape inside it) falls back to the value's start.
        """
        region = self.regions.get(keys)
        if self.text is None or region is None:
            return None
        start, end = region
        at = start
        if value is not None:
            cursor, line_start = start, 0
            for line in value.split("\n"):
                found = self.text.find(line, cursor, end) if line.strip() else -1
                if found >= 0:
                    cursor = found + len(line)
                if offset <= line_start + len(line):
                    at = found + offset - line_start if found >= 0 else start
                    break
                line_start += len(line) + 1
        line_start = self.text.rfind("\n", 0, at) + 1
        line_end = self.text.find("\n", at)
        line_end = len(self.text) if line_end == -1 else line_end
        return _Place(self.text.count("\n", 0, at) + 1, at - line_start,
                      self.text[line_start:line_end].rstrip("\r"))

    def relocate(self, error: SpecError, keys: Keys, value: str | None = None,
                 span: tuple[int, int] | None = None) -> SpecError:
        """Point ``error`` at ``span`` of the string ``value`` at ``keys``: at the file's line
        and column when there is a file, else at the string itself and the key."""
        place = self.place(keys, value, span[0] if span else 0)
        if place is not None:
            width = span[1] - span[0] if span else self._width(keys, place)
            error.origin = f"{self.path}:{place.line}:{place.column + 1}"
            error.spec, error.span = place.text, (place.column, place.column + max(1, width))
        else:
            where = None if keys == ("spec",) else self.describe(keys)
            error.origin = ": ".join(p for p in (self.path, where) if p) or None
            error.spec = value if span is not None else None
            error.span = span
        return error

    def _width(self, keys: Keys, place: _Place) -> int:
        start, end = self.regions[keys]
        return min(end - start, len(place.text) - place.column)

    def error(self, cls, message: str, keys: Keys, *, value: str | None = None,
              span: tuple[int, int] | None = None, hint: str | None = None) -> SpecError:
        return self.relocate(cls(message, hint=hint), keys, value, span)


def _syntax_place(text: str, path: str, message: str, line: int, column: int) -> SpecError:
    """A file that does not parse: its line with a caret (line and column are 1-based)."""
    lines = text.splitlines()
    shown = lines[line - 1] if 0 < line <= len(lines) else ""  # past the end: an empty line
    return SpecSyntaxError(message, spec=shown, span=(column - 1, column),
                           origin=f"{path}:{line}:{column}")


def _read_toml(text: str, path: str):
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        if match:
            raise _syntax_place(text, path, f"not valid TOML: {message}",
                                int(match.group(1)), int(match.group(2))) from None
        raise SpecSyntaxError(f"not valid TOML: {message}", origin=path) from None
    try:
        regions = _toml_regions(text)
    except (ValueError, IndexError):  # pragma: no cover - valid TOML the scanner misreads
        regions = {}
    return data, regions


def _read_json(text: str, path: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _syntax_place(text, path, f"not valid JSON: {error.msg}", error.lineno,
                            error.colno) from None
    regions: dict[Keys, tuple[int, int]] = {}
    _json_value(text, 0, (), regions)
    return data, regions


def _read_yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dev extra
        raise SpecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = f"not valid YAML: {error.problem or error.context}"
        if mark is None:
            raise SpecSyntaxError(message, origin=path) from None
        raise _syntax_place(text, path, message, mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as error:
        raise SpecSyntaxError(f"not valid YAML: {error}", origin=path) from None
    regions: dict[Keys, tuple[int, int]] = {}

    def walk(node, keys):
        regions[keys] = (node.start_mark.index, node.end_mark.index)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                walk(value_node, (*keys, key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*keys, i))

    if root is not None:
        walk(root, ())
    return data, regions


# -- value positions in JSON ---------------------------------------------------------------------

_JSON_SPACE = re.compile(r"[ \t\r\n]*")


def _json_value(text: str, i: int, keys: Keys, regions) -> int:
    """Record where the value at ``i`` (and everything inside it) stands; return its end."""
    i = _JSON_SPACE.match(text, i).end()
    start = i
    if text[i] in "{[":
        closing = "}" if text[i] == "{" else "]"
        i, index = i + 1, 0
        while True:
            i = _JSON_SPACE.match(text, i).end()
            if text[i] == closing:
                i += 1
                break
            if closing == "}":
                name, i = json.decoder.scanstring(text, i + 1)
                i = _JSON_SPACE.match(text, i).end() + 1  # past ':'
                i = _json_value(text, i, (*keys, name), regions)
            else:
                i = _json_value(text, i, (*keys, index), regions)
                index += 1
            i = _JSON_SPACE.match(text, i).end()
            if text[i] == ",":
                i += 1
    else:
        _, i = json.JSONDecoder().raw_decode(text, i)
    regions[keys] = (start, i)
    return i


# -- value positions in TOML ---------------------------------------------------------------------
# tomllib gives no positions, so a small scanner walks the (already valid) text: table headers,
# keys and values, with strings, arrays and inline tables skipped whole.

_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_SPACE = re.compile(r"[ \t]*")


def _toml_regions(text: str) -> dict[Keys, tuple[int, int]]:
    regions: dict[Keys, tuple[int, int]] = {}
    arrays: dict[Keys, int] = {}  # array-of-tables path -> how many tables so far
    table: Keys = ()
    i = 0
    while True:
        i = _toml_blank(text, i)
        if i >= len(text):
            return regions
        start = i
        if text[i] == "[":
            is_array = text.startswith("[[", i)
            names, i = _toml_keys(text, i + (2 if is_array else 1))
            i = text.index("]]" if is_array else "]", i) + (2 if is_array else 1)
            table = _toml_resolve(names, arrays)
            if is_array:
                arrays[table] = arrays.get(table, 0) + 1
                table = (*table, arrays[table] - 1)
            regions[table] = (start, i)
        else:
            i = _toml_pair(text, i, table, regions)


def _toml_resolve(names: Keys, arrays: dict[Keys, int]) -> Keys:
    """A header's keys as a data path: an array of tables stands for its last table."""
    keys: Keys = ()
    for name in names:
        keys = (*keys, name)
        if keys in arrays:
            keys = (*keys, arrays[keys] - 1)
    return keys


def _toml_pair(text: str, i: int, table: Keys, regions) -> int:
    names, i = _toml_keys(text, i)
    i = _TOML_SPACE.match(text, i).end() + 1  # past '='
    i = _TOML_SPACE.match(text, i).end()
    return _toml_value(text, i, (*table, *names), regions)


def _toml_value(text: str, i: int, keys: Keys, regions) -> int:
    start = i
    if text[i] == "{":
        i += 1
        while True:
            i = _toml_blank(text, i)
            if text[i] == "}":
                i += 1
                break
            i = _toml_pair(text, i, keys, regions)
            i = _toml_blank(text, i)
            if text[i] == ",":
                i += 1
    elif text[i] == "[":
        i, index = i + 1, 0
        while True:
            i = _toml_blank(text, i)
            if text[i] == "]":
                i += 1
                break
            i = _toml_value(text, i, (*keys, index), regions)
            index += 1
            i = _toml_blank(text, i)
            if text[i] == ",":
                i += 1
    elif text[i] in "\"'":
        i = _toml_string_end(text, i)
    else:
        match = re.compile(r"[^\s,}\]#]+(?:[ T][0-9:.+\-Z]+)?").match(text, i)
        i = match.end()
    regions[keys] = (start, i)
    return i


def _toml_string_end(text: str, i: int) -> int:
    quote = text[i]
    if text.startswith(quote * 3, i):
        j = i + 3
        while not text.startswith(quote * 3, j):
            j += 2 if quote == '"' and text[j] == "\\" else 1
        j += 3
        for _ in range(2):  # up to two more quotes may end the content itself
            if j < len(text) and text[j] == quote:
                j += 1
        return j
    j = i + 1
    while text[j] != quote:
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1


def _toml_keys(text: str, i: int) -> tuple[Keys, int]:
    names = []
    while True:
        i = _TOML_SPACE.match(text, i).end()
        if text[i] in "\"'":
            end = _toml_string_end(text, i)
            names.append(tomllib.loads("k = " + text[i:end])["k"])
            i = end
        else:
            match = _TOML_BARE_KEY.match(text, i)
            names.append(match.group(0))
            i = match.end()
        i = _TOML_SPACE.match(text, i).end()
        if text[i] != ".":
            return tuple(names), i
        i += 1


def _toml_blank(text: str, i: int) -> int:
    """Past whitespace, newlines and comments."""
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
        elif text[i] == "#":
            end = text.find("\n", i)
            i = len(text) if end == -1 else end
        else:
            break
    return i


# ----------------------------------------------------------------------------------------------
# A spec table

_ENTRIES = ("name", "description", "source", "spec", "self_attention", "let", "params",
            "tensors")


def _read_table(document: _Document, keys: Keys) -> SpecFile:
    table = document.get(keys)
    if isinstance(table, str):
        table, spec_keys = {"spec": table}, keys
    else:
        spec_keys = (*keys, "spec")
    if not isinstance(table, Mapping):
        raise document.error(SpecError, f"expected a spec table, got a {type(table).__name__}",
                             keys, hint='a spec table holds at least spec = "..."')
    for entry in table:
        if entry not in _ENTRIES:
            close = difflib.get_close_matches(str(entry), _ENTRIES, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + \
                "a spec table holds " + ", ".join(_ENTRIES)
            raise document.error(SpecError, f"unknown entry '{entry}'", (*keys, entry),
                                 hint=hint)
    if "spec" not in table:
        raise document.error(SpecError, "a spec table needs a 'spec' entry with the spec "
                                        "string", keys, hint='e.g. spec = "where q >= kv"')
    text = _entry(document, table, keys, "spec", str) if spec_keys != keys else table["spec"]
    metadata = {name: _entry(document, table, keys, name, str, "")
                for name in ("name", "description", "source")}
    self_attention = _entry(document, table, keys, "self_attention", bool, False)
    lets = _entry(document, table, keys, "let", Mapping, {})
    params = dict(_entry(document, table, keys, "params", Mapping, {}))

    spec, let_texts = _expand(document, text, spec_keys, lets, (*keys, "let"), params)
    checked = check(spec)
    params = _check_params(document, checked, params, (*keys, "params"))
    tensors = _read_recipes(document, checked, params,
                            _entry(document, table, keys, "tensors", Mapping, {}),
                            (*keys, "tensors"))
    origin = document.path or (document.describe(keys) or None)
    return SpecFile(spec=spec, params=params, tensors=tensors, origin=origin, lets=let_texts,
                    self_attention=self_attention, checked=checked, **metadata)


_TYPE_NAMES = {str: "a string", bool: "true or false", Mapping: "a table"}


def _entry(document: _Document, table: Mapping, keys: Keys, name: str, kind, default=None):
    if name not in table:
        return default
    value = table[name]
    if not isinstance(value, kind):
        raise document.error(SpecError, f"'{name}' must be {_TYPE_NAMES[kind]}, got "
                                        f"{type(value).__name__}", (*keys, name))
    return value


# -- lets and the spec -------------------------------------------------------------------------

_LET_LINE = re.compile(r"[ \t]*let[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(?!=)[ \t]*(\S.*?)[ \t]*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Let:
    """A named sub-expression: from a ``let`` line (``span`` in joined offsets) or from an
    entry of a [let] table (``keys``)."""
    name: str
    expression: ir.Expr
    text: str
    span: tuple[int, int] | None = None
    keys: Keys | None = None


class _Joined:
    """The strings that make one spec (lets, then the spec), joined so that one offset names
    a character of any of them. Parsing a string behind spaces that stand for everything
    before it gives its nodes spans in joined offsets, so an error found anywhere, even in a
    let substituted into the spec, is traced back to its string, and so to the file."""

    def __init__(self, document: _Document):
        self.document = document
        self.parts: list[tuple[int, str, Keys]] = []
        self.length = 0

    def add(self, text: str, keys: Keys) -> int:
        base = self.length
        self.parts.append((base, text, keys))
        self.length = base + len(text) + 1
        return base

    def parse(self, rule: Callable, base: int, start: int, stop: int):
        """``rule`` applied to characters [start, stop) of the string added at ``base``."""
        text = next(t for b, t, _ in self.parts if b == base)
        if not text[start:stop].strip():
            raise self.error(SpecSyntaxError, "the expression is empty",
                             (base + start, base + start + 1),
                             hint="write a score expression, a mask ('where q >= kv'), "
                                  "or both")
        try:
            return rule(" " * (base + start) + text[start:stop])
        except SpecError as error:
            raise self.relocate(error) from None

    def relocate(self, error: SpecError) -> SpecError:
        if error.span is None:
            return self.document.relocate(error, self.parts[-1][2])
        start, end = error.span
        base, text, keys = next(p for p in reversed(self.parts) if p[0] <= start)
        return self.document.relocate(error, keys, text, (start - base, end - base))

    def error(self, cls, message: str, span: tuple[int, int], hint: str | None = None):
        return self.relocate(cls(message, span=span, hint=hint))


def _expand(document: _Document, text: str, spec_keys: Keys, let_table: Mapping,
            let_keys: Keys, params: Mapping) -> tuple[str, dict[str, str]]:
    """The spec's text with every let substituted, checked where each piece was written."""
    joined = _Joined(document)
    definitions: list[_Let] = []
    for name, body in let_table.items():
        keys = (*let_keys, name)
        if not isinstance(body, str):
            raise document.error(SpecError, f"let '{name}' must be a string holding an "
                                            f"expression, got {type(body).__name__}", keys)
        base = joined.add(body, keys)
        definitions.append(_Let(str(name), joined.parse(parse_expression, base, 0, len(body)),
                                body.strip(), keys=keys))
    base = joined.add(text, spec_keys)
    body_start = _let_lines(joined, base, text, definitions)
    spec = joined.parse(parse, base, body_start, len(text))

    lets: dict[str, ir.Expr] = {}
    for i, let in enumerate(definitions):
        _judge_let_name(joined, let, definitions[:i], params)
        later = {d.name for d in definitions[i:]}
        for node in ir.walk(let.expression):
            if isinstance(node, ir.Name) and node.id in later:
                raise joined.error(SpecTypeError, f"'{node.id}' is used before it is "
                                                  "defined", node.span,
                                   hint="a let may use only the lets above it")
        lets[let.name] = substitute(let.expression, lets)
    parts = [p for p in (spec.score, spec.mask) if p is not None]
    for node in (n for p in parts for n in ir.walk(p)):
        if isinstance(node, (ir.Lookup, ir.Call)):
            named, use = ((node.tensor, "indexed") if isinstance(node, ir.Lookup)
                          else (node.func, "called"))
            if named in lets:
                raise joined.error(SpecTypeError, f"'{named}' is a let and cannot be {use}",
                                   node.name_span, hint=f"use it as a plain name: {named}")
    expanded = ir.Spec(substitute(spec.score, lets),
                       None if spec.mask is None else substitute(spec.mask, lets),
                       text=" " * joined.length)
    try:
        check(expanded)
    except SpecError as error:
        raise joined.relocate(error) from None
    let_texts = {d.name: d.text for d in definitions}
    if not definitions:
        return text[body_start:].strip(), let_texts
    return ir.unparse(expanded), let_texts


def _let_lines(joined: _Joined, base: int, text: str, definitions: list[_Let]) -> int:
    """Parse the ``let NAME = EXPRESSION`` lines that open ``text`` into ``definitions``;
    return where the spec itself starts."""
    offset, body_start = 0, None
    for line in text.split("\n"):
        stripped = line.strip()
        if re.match(r"let\b", stripped):
            at = base + offset + line.index("let")
            if body_start is not None:
                raise joined.error(SpecSyntaxError, "let lines come before the spec",
                                   (at, at + 3), hint="move this definition above the spec")
            match = _LET_LINE.fullmatch(line)
            if match is None:
                raise joined.error(SpecSyntaxError, "a let line reads 'let NAME = EXPRESSION'",
                                   (at, base + offset + len(line)),
                                   hint="e.g. let causal = q >= kv")
            expression = joined.parse(parse_expression, base, offset + match.start(2),
                                      offset + match.end(2))
            span = (base + offset + match.start(1), base + offset + match.end(1))
            definitions.append(_Let(match.group(1), expression, match.group(2), span=span))
        elif stripped and body_start is None:
            body_start = offset
        offset += len(line) + 1
    if body_start is None:
        raise joined.error(SpecSyntaxError, "the spec is empty" if not definitions else
                           "the spec is missing after the let lines",
                           (base + len(text), base + len(text) + 1),
                           hint="end with the spec, e.g. 'where causal'" if definitions else
                           "write the attention variant, e.g. 'where q >= kv'")
    return body_start


def _judge_let_name(joined: _Joined, let: _Let, earlier: list[_Let], params: Mapping) -> None:
    name, why = let.name, None
    if not _NAME.fullmatch(name):
        why = "a let is named like a parameter: letters, digits and _"
    elif name in ir.RESERVED:
        why = f"'{name}' is a name of the language"
    elif name in FUNCTIONS:
        why = f"'{name}' is a function"
    elif len(name) == 1 and name.islower():
        why = "single lowercase letters are kept for positions"
    elif any(name == other.name for other in earlier):
        why = "it is defined twice"
    elif name in params:
        why = "it is also a parameter"
    if why is None:
        return
    message = f"cannot define '{name}': {why}"
    hint = "name lets with several letters: causal, same_doc"
    if let.span is None:
        raise joined.document.error(SpecTypeError, message, let.keys, hint=hint)
    raise joined.error(SpecTypeError, message, let.span, hint=hint)


_NODE_TYPES = typing.get_args(ir.Expr)


def substitute(node: ir.Expr, lets: Mapping[str, ir.Expr]) -> ir.Expr:
    """``node`` with every name in ``lets`` replaced by its expression (which keeps its spans).

    >>> from flexdsl.grammar import parse_expression
    >>> causal = parse_expression("q >= kv")
    >>> ir.unparse(substitute(parse_expression("causal and not (q - kv) % 2 == 0"),
    ...                       {"causal": causal}))
    'q >= kv and not (q - kv) % 2 == 0'
    """
    if isinstance(node, ir.Name):
        return lets.get(node.id, node)
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, _NODE_TYPES):
            changes[f.name] = substitute(value, lets)
        elif isinstance(value, tuple) and value and isinstance(value[0], _NODE_TYPES):
            changes[f.name] = tuple(substitute(v, lets) for v in value)
    return dataclasses.replace(node, **changes) if changes else node


# -- parameters ----------------------------------------------------------------------------------

def _check_params(document: _Document, checked: CheckedSpec, params: Mapping,
                  keys: Keys) -> dict[str, Any]:
    from .bind import check_parameter  # pulls in sympy; only files with parameters pay
    out = {}
    signature = checked.signature
    for name, value in params.items():
        if name not in signature.params:
            if name in signature.tensors:
                hint = f"'{name}' is a tensor; describe it under [tensors.{name}]"
            else:
                close = difflib.get_close_matches(str(name), list(signature.params), n=1)
                hint = (f"did you mean '{close[0]}'?" if close else
                        f"this spec takes {', '.join(signature.params)}" if signature.params
                        else "this spec takes no parameters")
            raise document.error(SpecError, f"unknown parameter '{name}'", (*keys, name),
                                 hint=hint)
        try:
            out[name] = check_parameter(checked, name, value)
        except SpecError as error:
            raise document.relocate(error, (*keys, name)) from None
    return out


# ----------------------------------------------------------------------------------------------
# Example tensors

REQUIRED = object()
SIZE_NAMES = ("batch", "heads", "q_len", "kv_len")
_PER_CALL = frozenset({"batch", "q_len", "kv_len"})


@dataclass(frozen=True)
class _Kind:
    dtype: str                    # INT or FLOAT
    options: dict[str, Any]       # option -> default, or REQUIRED
    build: Callable               # (options with sizes evaluated, generator) -> tensor
    doc: str


def _documents(o, generator):
    import torch
    length, count = o["length"], max(1, min(o["count"], o["length"]))
    cuts = torch.randperm(max(length - 1, 0), generator=generator)[:count - 1] + 1
    starts = torch.zeros(length, dtype=torch.int64)
    starts[cuts] = 1
    return torch.cumsum(starts, 0) + o["first"]


def _alibi_slopes(o, generator):
    import torch
    # Press et al. 2022: a geometric sequence starting at 2^(-8/n) with that ratio, for n a
    # power of two; otherwise that of the nearest power below, then every other slope of twice
    # as many heads.
    n = o["length"]
    below = 2 ** int(math.floor(math.log2(n))) if n > 0 else 0
    slopes = [2.0 ** (-8.0 * (i + 1) / below) for i in range(below)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / below) for i in range(n - below)]
    return torch.tensor(slopes, dtype=torch.float64)


def _t5_buckets(o, generator):
    import torch
    # Raffel et al. 2020: small distances get a bucket each, larger ones share buckets spaced
    # logarithmically up to max_distance. Entry i is for q - kv = i - offset.
    buckets, far = o["buckets"], o["max_distance"]
    out = []
    for i in range(o["length"]):
        distance, bucket, n = i - o["offset"], 0, buckets
        if o["bidirectional"]:
            n //= 2
            bucket = n if distance < 0 else 0  # keys after the query get the upper half
            distance = abs(distance)
        else:
            distance = max(distance, 0)
        exact = n // 2
        if distance < exact:
            bucket += distance
        else:
            bucket += min(exact + int(math.log(distance / exact) / math.log(far / exact)
                                      * (n - exact)), n - 1)
        out.append(bucket)
    return torch.tensor(out, dtype=torch.int64)


def _sandwich(o, generator):
    import torch
    # Chi et al. 2023: the inner product of the sinusoidal embeddings of two positions,
    # sum over i = 1 .. dim/2 of cos((q - kv) / 10000^(2i/dim)); entry j is for q - kv = j - offset.
    distance = torch.arange(o["length"], dtype=torch.float64) - o["offset"]
    i = torch.arange(1, o["dim"] // 2 + 1, dtype=torch.float64)
    return torch.cos(distance[:, None] / 10000.0 ** (2 * i / o["dim"])).sum(-1)


def _normal(o, generator):
    import torch
    return torch.randn(o["shape"], generator=generator, dtype=torch.float64) * o["std"] + \
        o["mean"]


def _bernoulli(o, generator):
    import torch
    return (torch.rand(o["shape"], generator=generator) < o["p"]).to(torch.int64)


def _linspace(o, generator):
    import torch
    return torch.linspace(o["start"], o["stop"], o["length"], dtype=torch.float64)


TENSOR_KINDS: dict[str, _Kind] = {
    "documents": _Kind(INT, {"count": REQUIRED, "length": "max(q_len, kv_len)", "first": 0},
                       _documents, "sorted ids of `count` documents of random lengths, "
                                   "numbered from `first`"),
    "alibi_slopes": _Kind(FLOAT, {"length": "heads"}, _alibi_slopes,
                          "the per-head slopes of ALiBi"),
    "t5_buckets": _Kind(INT, {"length": REQUIRED, "offset": REQUIRED, "buckets": 32,
                              "max_distance": 128, "bidirectional": True}, _t5_buckets,
                        "T5's relative position bucket of q - kv = i - offset, for each i"),
    "sandwich": _Kind(FLOAT, {"length": REQUIRED, "offset": REQUIRED, "dim": REQUIRED},
                      _sandwich, "Sandwich's bias for q - kv = i - offset, for each i"),
    "normal": _Kind(FLOAT, {"shape": REQUIRED, "mean": 0.0, "std": 1.0}, _normal,
                    "independent normal values"),
    "bernoulli": _Kind(INT, {"shape": REQUIRED, "p": REQUIRED}, _bernoulli,
                       "1 with probability p, else 0"),
    "linspace": _Kind(FLOAT, {"length": REQUIRED, "start": REQUIRED, "stop": REQUIRED},
                      _linspace, "evenly spaced values from start to stop"),
}
_SIZE_OPTIONS = ("count", "length", "first", "offset", "buckets", "max_distance", "dim")
_NUMBER_OPTIONS = ("mean", "std", "p", "start", "stop")
_NUMBER_RANGES = {"std": (0.0, math.inf), "p": (0.0, 1.0)}
# The least value of a size option where its kind needs one (a document, a bucket).
_SIZE_MINIMA = {"count": 1, "buckets": 1, "max_distance": 1, "dim": 1, "length": 0}
# Example tensors past this many elements are refused rather than run out of memory.
_MAX_ELEMENTS = 1 << 30


def _read_recipes(document: _Document, checked: CheckedSpec, params: Mapping,
                  tables: Mapping, keys: Keys) -> dict[str, TensorRecipe]:
    recipes = {}
    signature = checked.signature
    for name, table in tables.items():
        here = (*keys, name)
        if name not in signature.tensors:
            close = difflib.get_close_matches(str(name), list(signature.tensors), n=1)
            hint = (f"did you mean '{close[0]}'?" if close else
                    f"this spec's tensors are {', '.join(signature.tensors)}"
                    if signature.tensors else "this spec uses no tensors")
            raise document.error(SpecError, f"'{name}' is not a tensor of the spec", here,
                                 hint=hint)
        if not isinstance(table, Mapping) or not isinstance(table.get("kind"), str):
            raise document.error(SpecError, f"tensor '{name}' needs a table with a kind",
                                 here, hint="kinds are " + ", ".join(TENSOR_KINDS))
        recipes[name] = _read_recipe(document, signature.tensors[name], params, table, here)
    return recipes


def _read_recipe(document, tensor, params: Mapping, table: Mapping, keys: Keys) -> TensorRecipe:
    kind = TENSOR_KINDS.get(table["kind"])
    if kind is None:
        close = difflib.get_close_matches(table["kind"], list(TENSOR_KINDS), n=1)
        raise document.error(SpecError, f"unknown tensor kind '{table['kind']}'",
                             (*keys, "kind"), hint=(f"did you mean '{close[0]}'? " if close
                                                    else "") + "kinds are "
                             + ", ".join(TENSOR_KINDS))
    options, reads = {}, set()
    for option, value in table.items():
        here = (*keys, option)
        if option in ("kind", "learnable"):
            continue
        if option not in kind.options:
            raise document.error(SpecError, f"'{table['kind']}' has no option '{option}'",
                                 here, hint="its options are " + ", ".join(kind.options))
        if option == "shape":
            if not isinstance(value, list):
                raise document.error(SpecError, "shape must be a list of sizes", here,
                                     hint='e.g. shape = ["heads", "q_len + kv_len"]')
            options[option] = [_size(document, v, (*here, i), params, reads)
                               for i, v in enumerate(value)]
        elif option in _SIZE_OPTIONS:
            options[option] = _size(document, value, here, params, reads)
        elif option in _NUMBER_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise document.error(SpecError, f"'{option}' must be a number", here)
            low, high = _NUMBER_RANGES.get(option, (-math.inf, math.inf))
            if not (math.isfinite(value) and low <= value <= high):
                raise document.error(SpecError, f"'{option}' is {value}", here,
                                     hint=f"'{option}' must be finite" + (
                                         f" and within [{low}, {high}]" if option == "p" else
                                         f" and at least {low}" if math.isfinite(low) else ""))
            options[option] = value
        elif not isinstance(value, type(kind.options[option])):
            raise document.error(SpecError, f"'{option}' must be "
                                            f"{type(kind.options[option]).__name__}", here)
        else:
            options[option] = value
    for option, default in kind.options.items():
        if option in options:
            continue
        if default is REQUIRED:
            raise document.error(SpecError, f"'{table['kind']}' needs '{option}'", keys,
                                 hint="its options are " + ", ".join(kind.options))
        options[option] = (_size(document, default, keys, params, reads)
                           if isinstance(default, str) else default)
    rank = len(options["shape"]) if "shape" in options else 1
    if rank != tensor.rank:
        raise document.error(SpecError, f"'{tensor.name}' has rank {tensor.rank} in the spec, "
                                        f"but a '{table['kind']}' tensor here has rank {rank}",
                             keys)
    if kind.dtype != tensor.dtype:
        raise document.error(SpecError, f"'{tensor.name}' holds {tensor.dtype}s in the spec, "
                                        f"but '{table['kind']}' makes {kind.dtype}s", keys)
    learnable = table.get("learnable", False)
    if not isinstance(learnable, bool):
        raise document.error(SpecError, "'learnable' must be true or false",
                             (*keys, "learnable"))
    if learnable and (kind.dtype != FLOAT or reads & _PER_CALL):
        why = ("only float tensors can be learned" if kind.dtype != FLOAT else
               "a learned tensor is model state, so its size cannot depend on "
               + ", ".join(sorted(reads & _PER_CALL)))
        raise document.error(SpecError, f"'{tensor.name}' cannot be learnable: {why}",
                             (*keys, "learnable"))
    origin = document.relocate(SpecError(""), keys).origin
    return TensorRecipe(tensor.name, table["kind"], options, learnable, frozenset(reads),
                        origin)


def _size(document: _Document, value, keys: Keys, params: Mapping, reads: set):
    """A size: an int, or an expression (parsed now, evaluated per call)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise document.error(SpecError, "a size is an integer or an expression in "
                                        + ", ".join(SIZE_NAMES), keys)
    try:
        expression = parse_expression(value)
    except SpecError as error:
        raise document.relocate(error, keys, value, error.span) from None
    for node in ir.walk(expression):
        if isinstance(node, ir.Name) and node.id not in SIZE_NAMES and node.id not in params:
            raise document.error(SpecError, f"unknown size '{node.id}'", keys, value=value,
                                 span=node.span, hint="sizes use " + ", ".join(SIZE_NAMES)
                                 + " and the parameters")
        if not isinstance(node, (ir.Num, ir.Name, ir.Unary, ir.Binary, ir.Call)) or (
                isinstance(node, ir.Call) and node.func not in _SIZE_FUNCTIONS) or (
                isinstance(node, ir.Binary) and node.op not in _SIZE_OPERATORS) or (
                isinstance(node, ir.Num) and not isinstance(node.value, int)):
            raise document.error(SpecError, "a size is an integer expression", keys,
                                 value=value, span=node.span,
                                 hint="sizes use + - * // % ** and min, max, abs")
        if isinstance(node, ir.Name):
            reads.add(node.id)
    return expression


_SIZE_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
                   "//": lambda a, b: a // b, "%": lambda a, b: a % b,
                   "**": lambda a, b: a ** b}
_SIZE_FUNCTIONS = {"min": min, "max": max, "abs": abs}


def _evaluate_size(node, values: Mapping[str, int]) -> int:
    if not isinstance(node, _NODE_TYPES):
        return node
    if isinstance(node, ir.Num):
        return node.value
    if isinstance(node, ir.Name):
        return values[node.id]
    if isinstance(node, ir.Unary):
        return -_evaluate_size(node.operand, values)
    if isinstance(node, ir.Call):
        return _SIZE_FUNCTIONS[node.func](*(_evaluate_size(a, values) for a in node.args))
    return _SIZE_OPERATORS[node.op](_evaluate_size(node.left, values),
                                    _evaluate_size(node.right, values))


def example_tensors(spec_file: SpecFile, *, batch: int = 1, heads: int = 1,
                    q_len: int | None = None, kv_len: int | None = None, seed: int = 0,
                    params: Mapping[str, Any] | None = None, device=None, dtype=None,
                    only: Any = None) -> dict[str, Any]:
    """The tensors of ``spec_file``'s recipes for a problem of this size, as a dict.

    Each tensor has its own generator, seeded from ``seed`` and its name, so a recipe's tensor
    does not change when another is added. Float tensors take ``dtype`` (default float32),
    int tensors int64. ``only`` limits the result to the names it holds.

    >>> f = read({"spec": "where doc[q] == doc[kv]",
    ...           "tensors": {"doc": {"kind": "documents", "count": 3}}})
    >>> example_tensors(f, q_len=10, kv_len=10)["doc"].unique().tolist()
    [0, 1, 2]
    """
    import torch
    values = {"batch": batch, "heads": heads, "q_len": q_len, "kv_len": kv_len,
              **spec_file.params, **(params or {})}
    out = {}
    for name, recipe in spec_file.tensors.items():
        if only is not None and name not in only:
            continue
        missing = sorted(n for n in recipe.reads if values.get(n) is None)
        if missing:
            raise SpecError(f"tensor '{name}' needs {', '.join(missing)} to be made",
                            origin=recipe.origin, hint="pass " + ", ".join(
                                f"{n}=..." for n in missing))
        kind = TENSOR_KINDS[recipe.kind]
        try:
            options = {k: ([_evaluate_size(s, values) for s in v] if k == "shape"
                           else _evaluate_size(v, values)) for k, v in recipe.options.items()}
        except ZeroDivisionError:
            raise SpecError(f"tensor '{name}': a size divides by zero", origin=recipe.origin,
                            hint="check the recipe's sizes and the parameters") from None
        sizes = options.get("shape", [options.get("length", 0)])
        if any(s < 0 for s in sizes):
            raise SpecError(f"tensor '{name}' would have a negative size {sizes}",
                            origin=recipe.origin)
        if math.prod(sizes) > _MAX_ELEMENTS:
            raise SpecError(f"tensor '{name}' would have {math.prod(sizes):,} elements "
                            f"(shape {sizes})", origin=recipe.origin,
                            hint=f"example tensors hold at most {_MAX_ELEMENTS:,}")
        for option, least in _SIZE_MINIMA.items():
            if option in options and options[option] < least:
                raise SpecError(f"tensor '{name}': '{option}' is {options[option]}",
                                origin=recipe.origin, hint=f"'{option}' must be at least {least}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = kind.build(options, generator)
        if kind.dtype == FLOAT:
            tensor = tensor.to(dtype or torch.float32)
        out[name] = tensor.to(device) if device is not None else tensor
    return out
