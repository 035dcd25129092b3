"""Specs from files: TOML spec files of the catalogue, or a table inside a user's config."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class SpecFile:
    """A spec with its metadata and default parameters, as a spec file holds it."""
    spec: str
    name: str = ""
    description: str = ""
    source: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None


def looks_like_path(text: str) -> bool:
    return text.endswith((".toml", ".json", ".yaml", ".yml")) or os.path.isfile(text)


def read_spec_file(path: str) -> SpecFile:
    """Read a TOML spec file: ``spec = "..."``, optional name, description, source, [params]."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"no such spec file: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from None
    return spec_from_table(data, origin=path)


def spec_from_table(data: dict, origin: str | None = None) -> SpecFile:
    if not isinstance(data, dict) or "spec" not in data:
        raise SpecError("a spec table needs a 'spec' entry with the spec string",
                        origin=origin, hint='e.g. spec = "where q >= kv"')
    if not isinstance(data["spec"], str):
        raise SpecError("'spec' must be a string", origin=origin)
    return SpecFile(spec=data["spec"], name=data.get("name", ""),
                    description=data.get("description", ""), source=data.get("source", ""),
                    params=dict(data.get("params", {})), tensors=dict(data.get("tensors", {})),
                    origin=origin)
