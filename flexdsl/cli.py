"""The command line: ``flexdsl check | show | lower | bench``.

Exit codes: 0 done, 1 the spec (or a file) is wrong, 2 the command line is wrong.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import ir
from .errors import SpecError

if TYPE_CHECKING:
    from .api import Attention
    from .config import SpecFile


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
        check_names(checked, params)
        params = {k: check_parameter(checked, k, v) for k, v in params.items()}
    except SpecError as error:
        raise error.with_spec(text, origin) from None
    print(f"spec: {checked}")
    lines = checked.signature.describe()
    print("signature:" if lines else "signature: no parameters or tensors")
    for line in lines:
        print(f"  {line}")
    attention = api.Attention(checked, params)
    for r in attention.index_ranges:
        print(f"  index     {attention.index_range_where_kept(r).describe()}")
    if params:
        print("bound: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    _print_score(attention)
    _print_diagonals(attention)
    _print_bounds(attention, params)
    _print_forward(attention)
    return 0


def _print_score(attention) -> None:
    """How the kernels treat a score expression other than the plain score."""
    from .analysis.separable import separable_bias
    spec = attention.spec
    if spec.spec.score == ir.Name(ir.SCORE):
        return
    split = separable_bias(spec)
    if split is not None:
        print(f"score: the bias {ir.unparse(split.bias)} splits into a query part and a key "
              "part: the kernels add the key part per element and the query part to lse")
        return
    derivatives = attention.derivatives
    if not derivatives.identity:
        print(f"score: d/d score = {ir.unparse(derivatives.d_score)} (the backward scales dP "
              "by it)")


def _print_diagonals(attention) -> None:
    """Terms the kernels read once per diagonal of a tile, not once per element."""
    from .analysis.diagonal import diagonal_terms
    for term in diagonal_terms(attention.spec):
        print(f"diagonal: {ir.unparse(term)} depends on q - kv alone: the kernels evaluate it "
              "once per diagonal of a tile and spread it with a gather")


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


def _print_forward(attention) -> None:
    """Whether the hand-written Hopper forward serves the spec (kernel/hopper.py)."""
    from .kernel import hopper
    kind = hopper.mask_kind(attention.analysis)
    if kind is not None:
        print(f"forward: {kind} attention: on an H100/H200 the hand-written warp-specialised "
              "kernel\n  (bf16 or fp16, head dim 64 or 128, keys a multiple of 128); elsewhere "
              "the rendered one")


# ----------------------------------------------------------------------------------------------
# show, lower, bench: a spec with its example tensors

class CommandError(Exception):
    """A failure that is not the spec's: a missing extra, a file that cannot be written."""


def _tensor_recipe(text: str) -> tuple[str, dict]:
    """``NAME=KIND[,OPTION=VALUE...]`` -> (name, recipe table); values read as TOML values
    (``count=4``, ``p=0.1``, ``shape=["heads", 32]``), else as strings (``length=q_len``)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=([A-Za-z_][A-Za-z0-9_]*)(?:,(.*))?", text,
                         re.S)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected NAME=KIND[,OPTION=VALUE...], got {text!r} (e.g. doc=documents,count=4)")
    name, kind, rest = match.groups()
    table: dict = {"kind": kind}
    for item in _split_top_level(rest or ""):
        option, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*", option):
            raise argparse.ArgumentTypeError(f"{name}: expected OPTION=VALUE, got {item!r}")
        try:
            table[option.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            table[option.strip()] = value.strip()
    return name, table


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets, parentheses and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    if value > _LARGEST:
        raise argparse.ArgumentTypeError(f"{value} is too large (at most 2**31 - 1)")
    return value


_LARGEST = 2 ** 31 - 1   # lengths and sizes: positions are computed in 32 bits on GPUs
# A plan or picture past this many tiles would take minutes and gigabytes to print or draw.
_MAX_TILES = 1 << 24


@dataclass
class _Problem:
    """A spec file (or string) compiled with its parameters, at one size."""
    spec_file: SpecFile
    attention: Attention
    params: dict
    q_len: int
    kv_len: int

    def tensors(self, **how):
        from .config import example_tensors
        return example_tensors(self.spec_file, q_len=self.q_len, kv_len=self.kv_len,
                               params=self.params, **how)


def _problem(args) -> _Problem:
    """Read SPEC (a string or a spec file), add --tensor recipes, bind -p parameters, and check
    that every tensor of the spec has a recipe."""
    from . import api, config
    if config.looks_like_path(args.spec):
        spec_file = config.read_spec_file(args.spec)
    else:
        spec_file = config.read({"spec": args.spec})
    checked = spec_file.checked
    given = dict(args.param or [])
    for name in given:
        if name in checked.signature.tensors:
            raise SpecError(f"'{name}' is a tensor of the spec, not a parameter",
                            spec=checked.text,
                            span=checked.signature.tensors[name].uses[0].span,
                            hint=f"pass it as --tensor {name}=KIND,...")
    params = {**spec_file.params, **given}
    if args.tensor:
        try:
            extra = config.read({"spec": spec_file.spec, "params": params,
                                 "tensors": dict(args.tensor)})
        except SpecError as error:
            if error.origin and error.origin.startswith("tensors."):
                error.origin = "--tensor " + error.origin[len("tensors."):]
            raise
        spec_file = replace(spec_file, tensors={**spec_file.tensors, **extra.tensors})
    attention = api.compile(spec_file.spec, **params)
    unbound = [p for p in checked.signature.params.values() if p.name not in params]
    if unbound:
        names = " and ".join(f"'{p.name}'" for p in unbound)
        raise SpecError(f"the spec needs a value for {names}", spec=checked.text,
                        span=unbound[0].span,
                        hint="pass " + " ".join(f"-p {p.name}=VALUE" for p in unbound))
    missing = [t for t in checked.signature.tensors.values() if t.name not in spec_file.tensors]
    if missing:
        tables = " and ".join(f"[tensors.{t.name}]" for t in missing)
        raise SpecError(_missing_tensors(missing, spec_file), spec=checked.text,
                        span=missing[0].uses[0].span,
                        hint="pass " + " ".join(f"--tensor {_example_recipe(t)}" for t in missing)
                        + (f", or add {tables} to the spec file" if spec_file.origin else
                           f", or use a spec file with {tables}")
                        + "; kinds are " + ", ".join(config.TENSOR_KINDS))
    kv_len = args.q_len if args.kv_len is None else args.kv_len
    if spec_file.self_attention and kv_len != args.q_len:
        raise SpecError(f"q and kv index one sequence here, so --kv-len must equal --q-len "
                        f"({args.q_len})", origin=spec_file.origin)
    return _Problem(spec_file, attention, dict(attention.defaults), args.q_len, kv_len)


def _missing_tensors(missing, spec_file) -> str:
    names = " and ".join(f"'{t.name}'" for t in missing)
    them = "it" if len(missing) == 1 else "them"
    where = (f"{spec_file.origin} has no recipe for {them}" if spec_file.origin else
             f"a spec string cannot say how to make {them}")
    return f"the spec needs the tensor{'s' if len(missing) > 1 else ''} {names}, and {where}"


def _example_recipe(tensor) -> str:
    if tensor.dtype == "int" and tensor.rank == 1:
        return f"{tensor.name}=documents,count=4"
    shape = ", ".join(['"heads"'] + ['"q_len + kv_len"'] * (tensor.rank - 1)) \
        if tensor.rank > 1 else '"heads"'
    kind = "normal" if tensor.dtype == "float" else "bernoulli"
    return f"'{tensor.name}={kind},shape=[{shape}]" + (",p=0.5'" if kind == "bernoulli" else "'")


class _Progress:
    """One line on stderr per stage, with the time since the command began."""

    def __init__(self, command: str, quiet: bool):
        self.command, self.quiet, self.start = command, quiet, time.perf_counter()

    def __call__(self, stage: str) -> None:
        if not self.quiet:
            print(f"flexdsl {self.command}: {stage} ({time.perf_counter() - self.start:.1f} s)",
                  file=sys.stderr, flush=True)


def _describe_problem(problem: _Problem, tensors: dict, seed: int) -> None:
    spec_file = problem.spec_file
    if spec_file.name:
        print(f"{spec_file.name}: {problem.attention.spec}")
    else:
        print(f"spec: {problem.attention.spec}")
    if problem.params:
        print("params: " + ", ".join(f"{k}={v}" for k, v in problem.params.items()))
    if tensors:
        print(f"example tensors (seed {seed}): " + ", ".join(
            f"{name} ({spec_file.tensors[name].kind}, {tuple(t.shape)})"
            for name, t in tensors.items()))


def cmd_show(args) -> int:
    progress = _Progress("show", args.quiet)
    block_m, block_n = _tiles(args)
    progress("reading and analysing the spec")
    problem = _problem(args)
    attention = problem.attention
    tensors = problem.tensors(seed=args.seed)
    tiles = -(-problem.q_len // block_m) * -(-problem.kv_len // block_n)
    if tiles > _MAX_TILES:
        raise CommandError(f"{tiles:,} tiles of {block_m}x{block_n} are too many to show "
                           f"(at most {_MAX_TILES:,}): pass a larger --tile, or shorter "
                           "--q-len and --kv-len")
    progress(f"planning {block_m}x{block_n} tiles")
    try:
        plan = attention.plan(problem.q_len, problem.kv_len, block_m=block_m, block_n=block_n,
                              **tensors)
        text = str(plan)
    except SpecError as error:
        raise error.with_spec(attention.spec.text) from None
    _describe_problem(problem, tensors, args.seed)
    print(text)
    if args.png:
        _picture(args, problem, tensors, plan, progress)
    return 0


def _tiles(args) -> tuple[int, int]:
    if args.tile is not None and (args.block_m is not None or args.block_n is not None):
        args.parser.error("--tile sets both tile sizes: give it or --block-m/--block-n")
    if args.tile is not None:
        return args.tile, args.tile
    return args.block_m or 128, args.block_n or 128


def _picture(args, problem: _Problem, tensors: dict, plan, progress) -> None:
    """The element-level mask (and score modification) at the pixels' positions, drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError("--png needs matplotlib: pip install 'flexdsl[viz]'") from None
    import torch

    from . import viz
    spec = problem.attention.spec
    height, width = viz.panel_size(problem.q_len, problem.kv_len)
    rows = torch.from_numpy(viz.pixel_positions(problem.q_len, height))
    cols = torch.from_numpy(viz.pixel_positions(problem.kv_len, width))
    progress(f"evaluating the mask at {len(rows)}x{len(cols)} positions")
    keep = _evaluate_at(spec.spec.mask, spec, rows, cols, problem, tensors)
    keep = torch.ones(len(rows), len(cols), dtype=torch.bool) if keep is None else keep
    modification = None
    if spec.spec.score != ir.Name(ir.SCORE):
        progress("evaluating the score expression")
        score = torch.full((1, 1, 1, 1), float(args.score), dtype=torch.float64)
        value = _evaluate_at(spec.spec.score, spec, rows, cols, problem, tensors, score)
        modification = torch.where(keep, value - args.score, torch.nan).numpy()
    progress(f"drawing {args.png}")
    title = problem.spec_file.name + ": " if problem.spec_file.name else ""
    try:
        viz.draw(args.png, mask=keep.numpy(), tiles=plan.tiles()[0, 0].numpy(),
                 q_len=problem.q_len, kv_len=problem.kv_len, block_m=plan.block_m,
                 block_n=plan.block_n, kept=plan.density(), visited=plan.tile_density,
                 modification=modification, score=args.score,
                 title=f"{title}{spec}   (q_len={problem.q_len}, kv_len={problem.kv_len})")
    except OSError as error:
        raise CommandError(f"cannot write {args.png}: {error.strerror or error}") from None
    progress(f"wrote {args.png}")


def _evaluate_at(node, spec, rows, cols, problem: _Problem, tensors: dict, score=None):
    """``node`` at b = h = 0 on the grid of query positions ``rows`` and keys ``cols``."""
    if node is None:
        return None
    import torch

    from . import eager
    positions = eager.positions(1, 1, problem.q_len, problem.kv_len, "cpu", 0, 0, 0, 0)
    positions["q"], positions["kv"] = rows.view(1, 1, -1, 1), cols.view(1, 1, 1, -1)
    params = {k: v for k, v in problem.params.items() if k in spec.signature.params}
    grid = eager.Grid(positions, params, tensors, torch.float64, score, spec.text)
    try:
        value = eager.evaluate(node, grid)
    except SpecError as error:
        raise error.with_spec(spec.text) from None
    return torch.broadcast_to(value, (1, 1, len(rows), len(cols)))[0, 0]


def cmd_lower(args) -> int:
    from . import api
    from .lower import render
    text, _, origin = _load(args.spec)
    try:
        attention = api.compile(text)
        # On a GPU, kernels for 16-bit inputs use the hardware's tanh.
        source = render(attention.spec, attention.analysis, attention.derivatives,
                        fast_tanh=args.dtype in ("bf16", "fp16"))
    except SpecError as error:
        raise error.with_spec(text, origin) from None
    print(source.text, end="" if source.text.endswith("\n") else "\n")
    return 0


def cmd_bench(args) -> int:
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        args.parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv_heads})")
    progress = _Progress("bench", args.quiet)
    progress("reading and analysing the spec")
    problem = _problem(args)
    import torch

    from . import bench
    cuda = torch.cuda.is_available()
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = getattr(torch, bench.DTYPES[dtype_name])
    device = "cuda" if cuda else "cpu"
    shape = bench.Shape(args.batch, args.heads, kv_heads, problem.q_len, problem.kv_len,
                        args.dim)
    progress("building inputs")
    tensors = problem.tensors(seed=args.seed, batch=args.batch, heads=args.heads)
    try:
        plan = problem.attention.plan(problem.q_len, problem.kv_len, batch=args.batch,
                                      heads=args.heads, **tensors)
        density, visited = plan.density(), plan.tile_density
    except SpecError as error:
        raise error.with_spec(problem.attention.spec.text) from None
    tensors = {n: t.to(device) for n, t in tensors.items()}
    q, k, v, grad = bench.inputs(shape, dtype, device, args.seed)
    _describe_problem(problem, tensors, args.seed)
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}, Triton kernels, {dtype_name}")
    else:
        print(f"device: no CUDA GPU, so this times the CPU path (chunked PyTorch), {dtype_name}")
    print(f"shape: batch {shape.batch}, heads {shape.heads} (kv heads {shape.kv_heads}), "
          f"q_len {shape.q_len}, kv_len {shape.kv_len}, dim {shape.dim}")
    print(f"tiles visited: {100 * visited:.1f}%" + (
        "" if density is None else f", positions kept: {100 * density:.1f}%"))

    def attention(q, k, v):
        return problem.attention(q, k, v, **tensors)

    try:
        timing = bench.time_attention(attention, q, k, v, grad, backward=not args.forward_only,
                                      progress=progress)
    except SpecError as error:
        raise error.with_spec(problem.attention.spec.text) from None
    print(f"first call: {timing.first_call_s:.2f} s" + (" (compiles the kernels)" if cuda
                                                         else ""))
    rows = [("forward", timing.forward_ms, 1.0)]
    if timing.forward_backward_ms is not None:
        rows.append(("forward+backward", timing.forward_backward_ms, 3.5))
    for name, ms, factor in rows:
        rate = "" if density is None else "  " + _rate(factor * shape.flops(density) / ms * 1e3)
        print(f"{name + ':':<18} {ms:10.3f} ms{rate}")
    if density is None:
        print("TFLOP/s: not shown, the fraction of kept positions is not known in closed form")
    return 0


def _rate(flops_per_second: float) -> str:
    if flops_per_second >= 1e12:
        return f"{flops_per_second / 1e12:7.1f} TFLOP/s"
    return f"{flops_per_second / 1e9:7.1f} GFLOP/s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexdsl", description="Attention variants as one line of text.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a spec and print its signature")
    check.add_argument("spec", help="a spec string, or a spec file (.toml)")
    check.add_argument("-p", "--param", action="append", type=_parameter, metavar="NAME=VALUE",
                       help="bind a parameter (repeatable)")
    check.set_defaults(run=cmd_check)

    show = commands.add_parser(
        "show", help="print the tile map of a spec; --png draws the mask and the tiles",
        description="Print the tile plan (# full, + partial, . empty) for these lengths and "
                    "tiles, with density. Tensors come from the spec file's [tensors] recipes "
                    "or from --tensor.")
    _problem_arguments(show)
    show.add_argument("--tile", type=_positive, metavar="T", help="square tiles of T (default "
                      "128)")
    show.add_argument("--block-m", type=_positive, metavar="BM", help="query tile size")
    show.add_argument("--block-n", type=_positive, metavar="BN", help="key tile size")
    show.add_argument("--png", metavar="FILE", help="also draw the mask, the tiles and any "
                      "score modification into a PNG (needs matplotlib: flexdsl[viz])")
    show.add_argument("--score", type=float, default=0.0, metavar="S",
                      help="the score at which the modification is drawn (default 0)")
    show.set_defaults(run=cmd_show, parser=show)

    lower = commands.add_parser("lower", help="print the Triton source rendered for a spec",
                                description="Print the Triton kernels (forward, dq, dk/dv) "
                                            "that a GPU runs for this spec.")
    lower.add_argument("spec", help="a spec string, or a spec file (.toml, FILE#KEY)")
    lower.add_argument("--dtype", choices=list(DTYPE_NAMES), default="bf16",
                       help="the input dtype the kernels are for (default bf16)")
    lower.set_defaults(run=cmd_lower)

    bench = commands.add_parser(
        "bench", help="time a spec: the kernels on a GPU, else the CPU path",
        description="Time the forward pass and forward+backward of one spec on random inputs.")
    _problem_arguments(bench)
    bench.add_argument("--batch", type=_positive, default=1)
    bench.add_argument("--heads", type=_positive, default=16)
    bench.add_argument("--kv-heads", type=_positive, help="key/value heads (default: --heads)")
    bench.add_argument("--dim", type=_positive, default=128, help="head dimension")
    bench.add_argument("--dtype", choices=list(DTYPE_NAMES),
                       help="bf16 on a GPU, fp32 on the CPU unless given")
    bench.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    bench.set_defaults(run=cmd_bench, parser=bench)
    return parser


DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a spec string, or a spec file (.toml, FILE#KEY)")
    parser.add_argument("--q-len", type=_positive, required=True, metavar="N")
    parser.add_argument("--kv-len", type=_positive, metavar="M", help="default: --q-len")
    parser.add_argument("-p", "--param", action="append", type=_parameter, metavar="NAME=VALUE",
                        help="bind a parameter (repeatable; overrides the file's)")
    parser.add_argument("-t", "--tensor", action="append", type=_tensor_recipe,
                        metavar="NAME=KIND[,OPTION=VALUE...]",
                        help="how to make an example tensor, as in a [tensors] table: "
                             "--tensor doc=documents,count=4 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example tensors")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SpecError, CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`flexdsl show ... | head`): not an error of ours. Point
        # stdout at nothing so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
