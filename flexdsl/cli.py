"""The command line: ``flexdsl check | show | lower | bench``.

Exit codes: 0 done, 1 the spec (or a file) is wrong, 2 the command line is wrong.
"""
from __future__ import annotations

import argparse
import re
import sys

from .errors import SpecError


def _parameter(text: str) -> tuple[str, int | float]:
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = match.groups()
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None


def _load(spec_or_path: str):
    """(spec text, default parameters, origin) from a spec string or a spec file."""
    from .config import looks_like_path, read_spec_file
    if looks_like_path(spec_or_path):
        spec_file = read_spec_file(spec_or_path)
        return spec_file.spec, dict(spec_file.params), spec_file.origin
    return spec_or_path, {}, None


def cmd_check(args) -> int:
    from . import api
    from .bind import check_names, check_parameter
    text, params, origin = _load(args.spec)
    try:
        checked = api.check(text)
        params.update(dict(args.param or []))
        check_names(checked, {k: v for k, v in params.items()
                              if k in checked.signature.params or k not in
                              checked.signature.tensors})
        params = {k: check_parameter(checked, k, v) for k, v in params.items()}
    except SpecError as error:
        raise error.with_spec(text, origin) from None
    print(f"spec: {checked}")
    lines = checked.signature.describe()
    print("signature:" if lines else "signature: no parameters or tensors")
    for line in lines:
        print(f"  {line}")
    attention = api.Attention(checked, params)
    for line in attention.index_ranges:
        print(f"  index     {line.describe()}")
    if params:
        print("bound: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    _print_bounds(attention, params)
    return 0


def _print_bounds(attention, params) -> None:
    """The tile analysis: key ranges per query, per query tile, and query ranges per key."""
    from .analysis.bounds import tile_ranges
    analysis = attention.analysis
    if attention.spec.spec.mask is None:
        print("mask: none; every tile is FULL")
        return
    print("keys per query:")
    for line in analysis.by_query.describe(params, attention.spec):
        print(f"  {line}")
    print("keys per query tile [q0, q0 + T):")
    for line in tile_ranges(analysis.by_query, attention.spec):
        print(line)
    print("queries per key (backward):")
    for line in analysis.by_key.describe(params, attention.spec):
        print(f"  {line}")
    if analysis.by_query.positive:
        print(f"requires {', '.join(analysis.by_query.positive)} > 0 (positions are divided "
              f"by {'them' if len(analysis.by_query.positive) > 1 else 'it'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexdsl", description="Attention variants as one line of text.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a spec and print its signature")
    check.add_argument("spec", help="a spec string, or a spec file (.toml)")
    check.add_argument("-p", "--param", action="append", type=_parameter, metavar="NAME=VALUE",
                       help="bind a parameter (repeatable)")
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
