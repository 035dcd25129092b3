"""A checked spec -> the source text of its Triton kernels (forward, dq, dk/dv).

The kernel is specialised only on the spec's structure: parameters, lengths and tensor sizes
are runtime arguments, marked ``do_not_specialize`` so new values never compile again. The
result is plain, readable text (``flexdsl lower SPEC`` prints it).
"""
from __future__ import annotations

import functools
import string
import textwrap
from dataclasses import dataclass
from importlib import resources

from .. import ir
from ..analysis.bounds import Solved, work_trend
from ..analysis.derivatives import ScoreDerivatives, TensorGradient
from ..analysis.diagonal import diagonal_terms
from ..analysis.plan import MaskAnalysis
from ..analysis.separable import keeps_non_finite, separable_bias
from ..check import BOOL, FLOAT, INT, CheckedSpec, Signature, TensorParam, Typer
from .expr import Divisor, Lowering, param_name, tensor_name

_TANH_PORTABLE = """\
    # tanh from exp2, which every backend (the interpreter too) has.
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)"""
_TANH_FAST = """\
    # The hardware's tanh.approx.f32: max relative error about 2**-11, ample for 16-bit inputs.
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x.to(tl.float32)],
                                     dtype=tl.float32, is_pure=True, pack=1)"""


@dataclass(frozen=True)
class KernelSource:
    """Rendered kernel text and the order of its spec-specific arguments."""
    text: str
    params: tuple[str, ...]                 # parameter names, in argument order
    tensors: tuple[TensorParam, ...]        # user tensors then derived ones, in argument order
    gradients: tuple[TensorGradient, ...]   # float tensors that receive gradients
    no_specialize: tuple[str, ...]          # runtime values Triton must not compile for

    @functools.cached_property
    def gradient_tensors(self) -> tuple[str, ...]:
        """The names of the tensors that receive gradients, each once, in argument order.
        Cached: every backward call asks."""
        return tuple(dict.fromkeys(g.tensor for g in self.gradients))


def render(spec: CheckedSpec, analysis: MaskAnalysis, derivatives: ScoreDerivatives, *,
           fast_tanh: bool) -> KernelSource:
    derived = _derived_tensors(analysis)
    signature = Signature(spec.signature.params,
                          {**spec.signature.tensors, **{t.name: t for t in derived}})
    type_of = Typer(signature).type_of
    tensors = (*spec.signature.tensors.values(), *derived)
    params = tuple(spec.signature.params)
    gradients = derivatives.tensors
    grad_names = tuple(dict.fromkeys(g.tensor for g in gradients))

    args = [param_name(p) for p in params]
    for t in tensors:
        name = tensor_name(t.name)
        args.append(name)
        args.extend(f"{name}_s{i}" for i in range(t.rank))
        args.extend(f"{name}_n{i}" for i in range(t.rank))
    grad_args = []
    for name in grad_names:
        rank = spec.signature.tensors[name].rank
        grad_args.append(f"g_{name}")
        grad_args.extend(f"g_{name}_s{i}" for i in range(rank))
    no_specialize = ["q_len", "kv_len", "sm_scale", "wave_heads",
                     *(a for a in args if not a.startswith("t_") or "_n" in a[2:])]
    no_specialize = [a for a in no_specialize if not _is_pointer(a, tensors)]

    diagonals = diagonal_terms(spec)
    tile = Lowering(type_of, {"q": "q_idx", "kv": "kv_idx", "b": "b", "h": "h"},
                    {"q": "q_ok", "kv": "kv_ok"}, divisors={}, reciprocal=True,
                    computed={term: _Window.name(i, type_of(term))
                              for i, term in enumerate(diagonals)}, raw_score="qk")
    score_code = _score_code(spec, tile)
    window = _Window.of(diagonals, type_of, tile.divisors)
    separable = separable_bias(spec)
    split = _split_bias(separable.bias, type_of, tile.divisors) if separable else None
    split_dkdv = _split_bias(separable.bias, type_of, tile.divisors,
                             finite_inputs=keeps_non_finite(separable.bias)) \
        if separable else None
    # Masked tiles always check the lengths; the spec's own mask joins in where it has one.
    expr = "kv_ok" if spec.spec.mask is None else f"({tile.expr(spec.spec.mask)}) & kv_ok"
    mask = _Mask(expr, _interval_test(analysis.by_query, "kv_idx"))
    mask_t = _Mask(f"{expr} & q_ok", _interval_test(analysis.by_key, "q_idx"))
    d_score = None if derivatives.identity else tile.floating(derivatives.d_score)
    dq_body = _dq_body(score_code, mask, d_score, gradients, tile, split, window)
    dq_gradients_init, dq_gradients_final = _row_gradient_code(gradients, tile)
    # Every expression of the loops is lowered by now: their divisors are known.
    divisors = list(tile.divisors.values())

    fields = {
        "Q_PROGRAM": _program(work_trend(analysis.by_query, spec), "q_len", "BLOCK_M"),
        "KV_PROGRAM": _program(work_trend(analysis.by_key, spec), "kv_len", "BLOCK_N"),
        "SPEC": ir.unparse(spec.spec).replace("\n", " "),
        "TANH": _TANH_FAST if fast_tanh else _TANH_PORTABLE,
        "NO_SPECIALIZE": ", ".join(repr(a) for a in no_specialize),
        "ARGS": "".join(f"{a}, " for a in args),
        "GRAD_ARGS": "".join(f"{a}, " for a in grad_args),
        "KEY_RANGE": textwrap.indent(_tile_range("n", "BLOCK_N", "kv_len")
                                     + (_SPLIT_GUARD if split else ""), " " * 4).rstrip(),
        "KEY_DESCRIPTORS": _KEY_DESCRIPTORS.rstrip(),
        "FWD_BOUNDS": _bounds_code(analysis.by_query, type_of, "q_idx_rows", "kv_len",
                                   indent=4),
        "DIVISORS": _prepare(divisors, indent=4),
        "FWD_BODY": _forward_body(score_code, mask, split, window),
        "FWD_SCORE_SETUP": window.setup(rows_first=True)
        + _split_setup(split, "start_m * BLOCK_M + BLOCK_M // 2"),
        "FWD_LSE_ROWS": textwrap.indent(
            f"if SPLIT_BIAS:\n    lse = lse + tl.where(sep_ok, {split.row}, 0.0)",
            " " * 4) if split else "",
        "DQ_SCORE_SETUP": window.setup(rows_first=True) + _split_setup(
            split, "start_m * BLOCK_M + BLOCK_M // 2", textwrap.indent(
                f"if SPLIT_BIAS:\n    lse2_rows = lse2 - tl.where(sep_ok, {split.row}, 0.0) "
                "* _LOG2E\nelse:\n    lse2_rows = lse2", " " * 4) if split else ""),
        "DKDV_SCORE_SETUP": window.setup(rows_first=False)
        + _split_setup(split, "start_n * BLOCK_N + BLOCK_N // 2", per_step=True),
        "DQ_BODY": dq_body,
        "DQ_GRADIENTS_INIT": dq_gradients_init,
        "DQ_GRADIENTS_FINAL": dq_gradients_final,
        "DKDV_LOOP": _dkdv_loop(analysis, type_of,
                                _dkdv_body(score_code, mask_t, d_score, split_dkdv, window),
                                divisors, per_head=_mask_uses_head(spec)
                                or any(d.per_head for d in divisors)),
    }
    template = resources.files("flexdsl.kernel").joinpath("templates/attention.py.in")
    text = string.Template(template.read_text()).substitute(fields)
    return KernelSource(text, params, tuple(tensors), gradients, tuple(no_specialize))


def _prepare(divisors: list[Divisor], indent: int) -> str:
    """The divisors' preparation, before a loop: once there, not at each use in a tile."""
    if not divisors:
        return " " * indent + "# no divisors fixed per program"
    return textwrap.indent("\n".join(d.preparation for d in divisors), " " * indent)


def _mask_uses_head(spec: CheckedSpec) -> bool:
    mask = spec.spec.mask
    return mask is not None and "h" in ir.names(mask)


def _tile_range(first: str, block: str, length: str) -> str:
    """The hull [span_lo, span_hi] and the full range [full_lo, full_hi], in positions, as
    tile starts: the loop runs from ``{first}_lo`` to ``{first}_hi`` by ``block``, and only
    tiles outside [f_start, f_stop) apply the mask. The forward and dq passes step over keys,
    the dk/dv pass over queries."""
    return textwrap.dedent(f"""\
        {first}_lo = (span_lo // {block}) * {block}
        {first}_hi = span_hi + 1
        f_start = ((full_lo + {block} - 1) // {block}) * {block}
        f_stop = tl.minimum(((full_hi + 1) // {block}) * {block}, ({length} // {block}) * {block})
        has_full = (full_lo <= full_hi) & (f_start < f_stop)
        f_start = tl.where(has_full, f_start, {first}_lo)
        f_stop = tl.where(has_full, f_stop, {first}_lo)
        """)


_QUERY_RANGE = _tile_range("m", "BLOCK_M", "q_len")

# A split bias not finite at the anchor (a head switched off by a table of -inf): every
# score of the program is -inf, so the forward and dq passes keep no key at all.
_SPLIT_GUARD = """\
if SPLIT_BIAS:
    n_hi = tl.where(sep_ok, n_hi, n_lo)
"""

# The forward and dq passes stream one key head's k and v tiles.
_KEY_DESCRIPTORS = """\
    if TMA:
        k_tiles = tl.make_tensor_descriptor(k_base, shape=[kv_len, D], strides=[skn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
        v_tiles = tl.make_tensor_descriptor(v_base, shape=[kv_len, D], strides=[svn, 1],
                                            block_shape=[BLOCK_N, HEAD_DIM])
"""

_HEAD_BASES = """\
off_bh = b * n_heads + h
q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
"""


def _dkdv_loop(analysis: MaskAnalysis, type_of, body: str, divisors: list[Divisor],
               per_head: bool) -> str:
    """The dk/dv pass's loop over (query head of the group, query tile). Where neither the
    mask nor a divisor names h, every head sees the same query range and divisors: one flat
    loop over both, since a loop nested in the group loop kept more values live and spilled
    registers. Otherwise the loops stay nested, with h's divisors prepared once per head."""
    fixed = [d for d in divisors if not d.per_head]
    by_head = [d for d in divisors if d.per_head]
    if per_head:
        bounds = _bounds_code(analysis.by_key, type_of, "kv_idx_rows", "q_len", indent=8)
        return "\n".join([
            _prepare(fixed, indent=4),
            "    for g in range(0, group):",
            "        h = kvh * group + g",
            bounds,
            textwrap.indent(_QUERY_RANGE + _HEAD_BASES, " " * 8).rstrip(),
            *([_prepare(by_head, indent=8)] if by_head else []),
            "        for start_m in range(m_lo, m_hi, BLOCK_M):",
            textwrap.indent(body, " " * 12),
        ])
    assert not by_head, "divisors that name h need the nested loops"
    bounds = _bounds_code(analysis.by_key, type_of, "kv_idx_rows", "q_len", indent=4)
    return "\n".join([
        bounds,
        textwrap.indent(_QUERY_RANGE, " " * 4).rstrip(),
        _prepare(fixed, indent=4),
        "    m_tiles = tl.maximum(tl.cdiv(m_hi - m_lo, BLOCK_M), 0)",
        "    for step in range(0, group * m_tiles):",
        "        g = step // m_tiles",
        "        start_m = m_lo + (step - g * m_tiles) * BLOCK_M",
        "        h = kvh * group + g",
        textwrap.indent(_HEAD_BASES, " " * 8).rstrip(),
        textwrap.indent(body, " " * 8),
    ])


def _program(trend: int, rows: str, block: str) -> str:
    """The (row tile, batch x head) a program takes from its place in the grid (see
    _tile_and_head): where the work rises or falls along the rows, heavy tiles first."""
    return f"_tile_and_head(tl.maximum(tl.cdiv({rows}, {block}), 1), wave_heads, {trend})"


def _is_pointer(arg: str, tensors) -> bool:
    return any(arg == tensor_name(t.name) for t in tensors)


def _derived_tensors(analysis: MaskAnalysis) -> list[TensorParam]:
    """The run tensors of sorted lookups (``doc__lo_kv``...), as int tensors of the spec."""
    out = {}
    for solved in (analysis.by_query, analysis.by_key):
        for c in solved.conjunctions:
            for d in c.documents:
                for lookup in (d.lower, d.upper):
                    out[lookup.tensor] = TensorParam(lookup.tensor, len(lookup.indices), INT, ())
    return list(out.values())


@dataclass(frozen=True)
class _SplitBias:
    """A separable bias B (``analysis/separable.py``) lowered with one position at the anchor
    ``sep_a``, the middle of the program's tile: ``col`` is B(sep_a, kv) over the tile's
    keys, ``row`` B(q, sep_a) over the forward's and dq pass's query rows, ``row_t`` the same
    over the dk/dv pass's query tile, ``corner`` B(sep_a, sep_a). Inside the loops a tile adds
    col - corner; row goes to the log-sum-exp, which softmax does not otherwise see."""
    col: str
    row: str
    row_t: str
    corner: str
    guarded: bool = False    # the dk/dv pass selects each step's terms against sep_ok


def _split_bias(bias: ir.Expr, type_of, divisors: dict,
                finite_inputs: bool = False) -> _SplitBias:
    """The split parts of ``bias``. A split bias reads no table by position
    (separable._finite), so no load needs a mask for padding rows or columns, and it is not
    finite only where a value it reads by head or batch is not (a head switched off with a
    table of -inf) or where it divides by 0. Then B at the anchor is not finite either, the
    program's rows are empty, and the forward and dq passes skip their loop (``sep_ok``).
    The dk/dv pass, whose steps change head, guards each step's terms with a select, unless
    ``finite_inputs``: for a bias that is not finite wherever a value it reads is not
    (separable.keeps_non_finite: +, -, * and abs), it reads such values as 0 instead, since
    those rows come to it with lse2 = +inf and their P is 0 all the same. The select cost
    the ALiBi + documents backward at D=64 20% on the H200."""
    def lower(q: str, kv: str) -> str:
        return Lowering(type_of, {"q": q, "kv": kv, "b": "b", "h": "h"},
                        divisors=divisors, reciprocal=True,
                        finite_inputs=finite_inputs).floating(bias)
    return _SplitBias(col=lower("sep_a", "kv_idx"), row=lower("q_rows", "sep_a"),
                      row_t=lower("q_rows_t", "sep_a"), corner=lower("sep_a", "sep_a"),
                      guarded=not finite_inputs)


def _split_setup(split: _SplitBias | None, anchor: str, after: str = "",
                 per_step: bool = False) -> str:
    """Before a loop: the anchor, the middle of the program's tile, and (unless the head
    changes from step to step, ``per_step``) B there and whether it is finite."""
    if split is None:
        return ""
    lines = [f"    sep_a = {anchor}"]
    if not per_step:
        lines += _corner(split, "    ")
    return "\n".join(lines + ([after] if after else []))


def _corner(split: _SplitBias, indent: str) -> list[str]:
    # B at the anchor is infinite only where a table the bias reads by head or batch is (a
    # head switched off with -inf): then every score of the program is, and its rows are
    # empty; sep_ok keeps inf - inf out of them (_SPLIT_GUARD, and the lse terms).
    return [f"{indent}sep_aa = {split.corner}", f"{indent}sep_ok = _finite(sep_aa)"]


@dataclass(frozen=True)
class _Window:
    """The terms of the score and mask that are one value per diagonal of the tile
    (``analysis/diagonal.py``), each evaluated once per difference q - kv of the tile and
    spread over it as ``win<i>`` by a gather whose indices ``win_at`` are the same for every
    tile of the loop. The values: the tile's last key ``win_kv`` against queries ``win_q``
    from the tile's first on, real positions (never negative, as the analysis assumes) whose
    differences run from the tile's smallest q - kv up."""
    texts: tuple[str, ...]    # each term lowered at (win_q, win_kv), as the gather's source

    @classmethod
    def of(cls, terms: tuple[ir.Expr, ...], type_of, divisors: dict) -> "_Window":
        # Lowered once, here, so that their divisors join the program's before it prepares
        # them. A term whose q and kv cancel is one value: broadcast over the window.
        lower = Lowering(type_of, {"q": "win_q", "kv": "win_kv", "b": "b", "h": "h"},
                         divisors=divisors, reciprocal=True)
        texts = []
        zeros = "tl.zeros_like(win_q)"
        for term in terms:
            if type_of(term) == BOOL:
                texts.append(f"(({lower.expr(term)}).to(tl.int8) + {zeros}.to(tl.int8))")
            elif type_of(term) == FLOAT:
                texts.append(f"({lower.floating(term)} + {zeros}.to(tl.float32))")
            else:
                texts.append(f"({lower.expr(term)} + {zeros})")
        return cls(tuple(texts))

    @staticmethod
    def name(i: int, dtype: str) -> str:
        """The text of term ``i`` over the tile (a condition travels as int8)."""
        return f"(win{i} != 0)" if dtype == BOOL else f"win{i}"

    def setup(self, rows_first: bool) -> str:
        """Before the loop: for each element of a [BLOCK_M, BLOCK_N] tile (``rows_first``,
        queries as rows) or a [BLOCK_N, BLOCK_M] one, where in the window its value lies."""
        if not self.texts:
            return ""
        at = ("tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]" if rows_first
              else "tl.arange(0, BLOCK_M)[None, :] - tl.arange(0, BLOCK_N)[:, None]")
        return f"    win_at = ({at} + (BLOCK_N - 1)).reshape(BLOCK_M * BLOCK_N)\n"

    def values(self, first_q: str, first_kv: str, shape: str) -> list[str]:
        """In the loop, for the tile whose first query is ``first_q`` and first key
        ``first_kv``: the window (element t: q - kv = first_q - first_kv - (BLOCK_N - 1) + t)
        and each term over the tile."""
        if not self.texts:
            return []
        lines = [f"win_q = {first_q} + _differences(BLOCK_M, BLOCK_N)",
                 f"win_kv = {first_kv} + (BLOCK_N - 1)"]
        for i, text in enumerate(self.texts):
            lines.append(f"win{i} = tl.gather({text}, win_at, 0).reshape({shape})")
        return lines


def _scaled_score(product: str, score_code: str, split: _SplitBias | None,
                  first: tuple[str, ...] = ()) -> list[str]:
    """Lines that leave the score expression in base-2 units in ``s2``. A separable bias is
    split where the constexpr SPLIT_BIAS is true (launch.py), after the lines ``first``
    (the dk/dv pass's per-step anchor terms, guarded where ``split.guarded``)."""
    if score_code is None:
        return [f"s2 = {product} * qk_scale"]  # one multiply: the scale folded into log2(e)
    whole = ([] if product == "qk" else [f"qk = {product}"]) + [score_code]
    if split is None:
        return whole
    # One multiply-add per element, as for a plain score; the rows' part is in lse.
    col2 = f"({split.col} - sep_aa) * _LOG2E"
    if first and split.guarded:
        col2 = f"tl.where(sep_ok, {col2}, -float(\"inf\"))"
    parts = [*first, f"col2 = {col2}", f"s2 = {product} * qk_scale + col2"]
    return ["if SPLIT_BIAS:", *_indented(parts, 4), "else:", *_indented(whole, 4)]


def _score_code(spec: CheckedSpec, tile: Lowering) -> str | None:
    """The line that leaves the score expression, in base-2 units, in ``s2`` (None for the
    plain score): ``tile`` gathers sm_scale, log2(e) and the expression's own per-program
    factors into one multiplier of each term (``Lowering.scaled``)."""
    if spec.spec.score == ir.Name(ir.SCORE):
        return None
    s2 = tile.scaled(spec.spec.score, ("_LOG2E",))
    if ir.SCORE in ir.names(spec.spec.score):
        return f"s2 = {s2}"
    # Broadcast to the tile: the expression may be a row's or a column's value, or one value.
    # (Not with the score: adding +0.0 is an add the compiler must keep, for -0.0.)
    return f"s2 = {s2} + tl.zeros_like(qk)"


@dataclass(frozen=True)
class _Mask:
    """What a partial tile keeps: the spec's mask (``expr``), or, where the per-row bounds
    decide it exactly, the test of them (``interval``): for packed documents they hold each
    row's run, read once per program, where the mask reads the ids of the tile's keys and
    queries on every partial tile. The runs are exact only for sorted ids: the constant
    EXACT_RUNS picks the test, so that a kernel holds one of the two (with both behind a
    run-time flag the compiler evaluated both, and the documents forward loop went 827 ->
    1132 instructions where the test alone takes it to 557)."""
    expr: str
    interval: str | None = None

    def keep(self) -> list[str]:
        """Lines that set ``keep``, a boolean tile."""
        if self.interval is None:
            return [f"keep = {self.expr}"]
        return ["if EXACT_RUNS:", f"    keep = {self.interval}", "else:",
                f"    keep = {self.expr}"]


def _interval_test(solved: Solved, col: str) -> str | None:
    """``col`` inside a row's bounds [lo<j>, hi<j>] of some conjunction (``_bounds_code``
    names them; rows past the length or filtered out have lo > hi), where the bounds alone
    decide the mask and some conjunction reads runs of a sorted lookup."""
    if not (solved.conjunctions and solved.exact
            and any(c.documents for c in solved.conjunctions)):
        return None
    return " | ".join(f"(({col} >= lo{j}[:, None]) & ({col} <= hi{j}[:, None]))"
                      for j in range(len(solved.conjunctions)))


def _bounds_code(solved: Solved, type_of, rows: str, col_len: str, indent: int) -> str:
    """Per-row bounds reduced to a hull [span_lo, span_hi] and a full range [full_lo, full_hi]."""
    row_var = solved.row
    lower = Lowering(type_of, {row_var: rows, "b": "b", "h": "h"}, {row_var: "row_ok"})
    lines = [f"span_lo = {col_len} + 0 * b", "span_hi = -1 + 0 * b",
             "full_lo = 1 + 0 * b", "full_hi = 0 + 0 * b",
             f"zero_rows = tl.zeros_like({rows})"]
    for j, c in enumerate(solved.conjunctions):
        lines.append(f"# {'; '.join(_describe(c, solved))}")
        lines.append(f"lo{j} = zero_rows")
        lines.append(f"hi{j} = zero_rows + ({col_len} - 1)")
        for bound in c.lower + tuple(d.lower for d in c.documents):
            lines.append(f"lo{j} = tl.maximum(lo{j}, {lower.expr(bound)})")
        for bound in c.upper + tuple(d.upper for d in c.documents):
            lines.append(f"hi{j} = tl.minimum(hi{j}, {lower.expr(bound)})")
        keep = " & ".join(["row_ok", *(f"({lower.expr(r)})" for r in c.rows)])
        lines.append(f"ok{j} = {keep}")
        lines.append(f"lo{j} = tl.where(ok{j}, lo{j}, {col_len}).to(tl.int32)")
        lines.append(f"hi{j} = tl.where(ok{j}, hi{j}, -1).to(tl.int32)")
        lines.append(f"span_lo = tl.minimum(span_lo, tl.min(tl.where(lo{j} <= hi{j}, lo{j}, "
                     f"{col_len}), 0))")
        lines.append(f"span_hi = tl.maximum(span_hi, tl.max(tl.where(lo{j} <= hi{j}, hi{j}, "
                     f"-1), 0))")
        if c.exact:
            # Padding rows (past the length) constrain nothing.
            lines.append(f"f_lo{j} = tl.max(tl.where(row_ok, lo{j}, -1), 0)")
            lines.append(f"f_hi{j} = tl.min(tl.where(row_ok, hi{j}, {col_len}), 0)")
            if c.documents:  # unsorted lookups make the run tensors trivial: not a full range
                lines += ["if not EXACT_RUNS:", f"    f_hi{j} = f_lo{j} - 1"]
            lines.append(f"full_lo, full_hi = _merge_full(full_lo, full_hi, f_lo{j}, f_hi{j})")
    if not solved.conjunctions:
        lines.append("# the mask is never true")
    return textwrap.indent("\n".join(lines), " " * indent)


def _describe(c, solved: Solved) -> list[str]:
    parts = [f"{solved.col} >= {ir.unparse(b)}" for b in c.lower]
    parts += [f"{solved.col} <= {ir.unparse(b)}" for b in c.upper]
    parts += [ir.unparse(r) for r in c.rows]
    parts += [f"{d.tensor}[{solved.row}] == {d.tensor}[{solved.col}]" for d in c.documents]
    parts += [f"masked: {ir.unparse(a)}" for a, _ in c.residual]
    return parts or ["every position"]


def _dot(a: str, b: str, acc: str = "None") -> str:
    return f"_dot({a}, {b}, {acc}, IEEE)"


def _key_tile(load_v: str, v_tma: str) -> list[str]:
    """Positions of the key tile at ``start_n``, k as [HEAD_DIM, BLOCK_N], and v as ``load_v``
    (or ``v_tma``, from the descriptor) lays it out: [BLOCK_N, HEAD_DIM] for P @ V,
    transposed for dP = dO @ Vᵀ."""
    return [
        "start_n = tl.multiple_of(start_n, BLOCK_N)",
        "kv_cols = start_n + tl.arange(0, BLOCK_N)",
        "kv_idx = kv_cols[None, :]",
        "kv_ok = kv_idx < kv_len",
        "if TMA:",
        "    k = tl.trans(k_tiles.load([start_n, 0]))",
        f"    v = {v_tma}",
        "else:",
        "    k = tl.load(k_base + kv_idx * skn + offs_d[:, None] * skd, "
        "mask=kv_ok & d_ok[:, None], other=0.0)",
        f"    {load_v}",
        "if DOT_F32:",
        "    k = k.to(tl.float32)",
        "    v = v.to(tl.float32)",
    ]


def _indented(lines: list[str], spaces: int) -> list[str]:
    return [" " * spaces + line for line in lines]


def _forward_body(score_code: str, mask: _Mask, split: _SplitBias | None,
                  window: _Window) -> str:
    """One key tile of the online softmax. One loop visits every tile of the hull and masks
    only the tiles outside the full range: three loops (masked, full, masked) held more
    values live at once and spilled registers."""
    identity = score_code is None
    lines = [*_key_tile("v = tl.load(v_base + kv_cols[:, None] * svn + offs_d[None, :] * svd, "
                        "mask=(kv_cols[:, None] < kv_len) & d_ok[None, :], other=0.0)",
                        "v_tiles.load([start_n, 0])"),
             f"qk = {_dot('q', 'k')}",
             *window.values("start_m * BLOCK_M", "start_n", "BLOCK_M, BLOCK_N"),
             "masked = (start_n < f_start) | (start_n >= f_stop)"]
    if identity:
        # Plain scores with a positive scale: the row maximum of qk, scaled afterwards, so
        # that each element costs one fused multiply-add on its way to exp2.
        lines += ["if POS_SCALE:",
                  "    if masked:",
                  *_indented(mask.keep(), 8),
                  "        qk = tl.where(keep, qk, -float(\"inf\"))",
                  "    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)",
                  "    s2 = qk * qk_scale",
                  "else:",
                  "    s2 = qk * qk_scale",
                  "    if masked:",
                  *_indented(mask.keep(), 8),
                  "        s2 = tl.where(keep, s2, -float(\"inf\"))",
                  "    m_new = tl.maximum(m_i, tl.max(s2, 1))"]
    else:
        lines += [*_scaled_score("qk", score_code, split),
                  "if masked:",
                  *_indented(mask.keep(), 4),
                  "    s2 = tl.where(keep, s2, -float(\"inf\"))",
                  "m_new = tl.maximum(m_i, tl.max(s2, 1))"]
    lines += [
        "m_safe = tl.where(m_new == -float(\"inf\"), 0.0, m_new)",
        "alpha = tl.exp2(m_i - m_safe)",
        "p = tl.exp2(s2 - m_safe[:, None])",
        "l_i = l_i * alpha + tl.sum(p, 1)",
        f"acc = {_dot('p.to(v.dtype)', 'v', 'acc * alpha[:, None]')}",
        "m_i = m_new",
    ]
    return textwrap.indent("\n".join(lines), " " * 8)


def _gradient_code(g: TensorGradient, tile: Lowering, valid: str) -> list[str]:
    """Accumulate ds * d(score expression)/d T[i...] into T's gradient, for a table indexed by
    kv (the others finish per query row: ``_row_gradient_code``): a relative-position table
    along the tile's diagonals, a table of kv alone summed over the tile's rows first, one
    of q and kv with one atomic per position."""
    value = f"tl.where({valid}, ds * ({tile.floating(g.derivative)}), 0.0)"
    if g.relative:
        return _diagonal_gradient(g, value, tile)
    pointer = _gradient_pointer(g, tile)
    if "q" in ir.names(*g.lookup.indices):
        return [f"tl.atomic_add({pointer}, {value}, mask={valid})"]
    return [f"tl.atomic_add({pointer}, tl.sum({value}, 0)[None, :], mask=kv_ok)"]


def _gradient_pointer(g: TensorGradient, tile: Lowering) -> str:
    offsets = []
    for i, index in enumerate(g.lookup.indices):
        idx = f"tl.minimum(tl.maximum({tile.expr(index)}, 0), {tensor_name(g.tensor)}_n{i} - 1)"
        offsets.append(f"({idx}).to(tl.int64) * g_{g.tensor}_s{i}")
    return f"g_{g.tensor} + " + " + ".join(offsets)


def _diagonal_gradient(g: TensorGradient, value: str, tile: Lowering) -> list[str]:
    """One atomic per diagonal of the [BLOCK_M, BLOCK_N] tile instead of one per position.

    Row i is rotated left by i (a gather), so that column j holds the positions with
    kv - q = j - BLOCK_N * w for the w-th wrap; a column sum per wrap gives each diagonal."""
    diagonal = Lowering(tile.type_of, {"q": "diag_q", "kv": "diag_kv", "b": "b", "h": "h"},
                        divisors=tile.divisors)
    pointer = _gradient_pointer(g, diagonal)
    return [
        f"g_vals = {value}",
        "diag_i = tl.arange(0, BLOCK_M)[:, None]",
        "diag_j = tl.arange(0, BLOCK_N)[None, :]",
        "g_skew = tl.gather(g_vals, (diag_i + diag_j) % BLOCK_N, 1)",
        "for diag_w in tl.static_range((BLOCK_M + BLOCK_N - 2) // BLOCK_N + 1):",
        "    diag_sum = tl.sum(tl.where((diag_i + diag_j) // BLOCK_N == diag_w, g_skew, 0.0), 0)",
        # Each diagonal's q - kv, at real positions (the tile's last key, and a query from
        # the tile's first on), which the analysis of the index takes to be >= 0.
        "    diag_kv = tl.zeros([BLOCK_N], dtype=tl.int32) + (start_n + BLOCK_N - 1)",
        "    diag_q = diag_kv + start_m * BLOCK_M - start_n - tl.arange(0, BLOCK_N) "
        "+ BLOCK_N * diag_w",
        f"    tl.atomic_add({pointer}, diag_sum)",
    ]


def _recompute(product: str, score_code: str, mask: _Mask, rows: str, dp: str,
               d_score: str | None, split: _SplitBias | None, lse2: str = "lse2",
               first: tuple[str, ...] = (), after_p: tuple[str, ...] = (),
               after_ds: tuple[str, ...] = ()) -> list[str]:
    """The backward's shared middle: scores again, P from the saved log-sum-exp, and
    dscore = P * (dP - delta) * d(score expression)/d(score). ``rows`` broadcasts a per-query
    vector over the tile's orientation. Only tiles outside the full range (``masked``) apply
    ``mask``; there P is 0 where the mask is false, so dscore is too. ``lse2`` names the
    rows' log-sum-exp in base 2 (less their part of a separable bias)."""
    lines = [
        *_scaled_score(product, score_code, split, first),
        # Masked after lse2 is taken off, not before: the scale and the subtraction fuse into
        # one multiply-add on every tile (a select between them kept them apart).
        f"z = s2 - {lse2}{rows}",
        "if masked:",
        *_indented(mask.keep(), 4),
        "    z = tl.where(keep, z, -float(\"inf\"))",
        "p = tl.exp2(z)",
        *after_p,
        f"dp = {dp}",
        f"ds = p * (dp - delta{rows})",
    ]
    if d_score is None:
        lines.append("dscore = ds")
    else:
        # The derivative may be anything where the mask is false (a lookup out of range).
        lines += [f"dscore = ds * ({d_score})",
                  "if masked:",
                  *_indented(mask.keep(), 4),
                  "    dscore = tl.where(keep, dscore, 0.0)"]
    return lines + list(after_ds)


def _dq_body(score_code, mask, d_score, gradients, tile: Lowering,
             split: _SplitBias | None, window: _Window) -> str:
    gradient_lines = []
    if gradients:
        body = ["g_valid = q_ok & kv_ok", "if masked:", *_indented(mask.keep(), 4),
                "    g_valid = g_valid & keep"]
        rows = _row_gradients(gradients)
        if rows:
            body.append("g_pdp += tl.sum(tl.where(g_valid, p * dp, 0.0), 1)")
        for i, g in enumerate(gradients):
            if g in rows:
                body += [f"g_w = tl.where(g_valid, p * ({tile.floating(g.derivative)}), 0.0)",
                         f"g{i}_pw += tl.sum(g_w, 1)",
                         f"g{i}_pdpw += tl.sum(g_w * dp, 1)"]
            else:
                body += _gradient_code(g, tile, "g_valid")
        gradient_lines = ["if TENSOR_GRADS:", *_indented(body, 4)]
    lines = [
        *_key_tile("v = tl.load(v_base + kv_idx * svn + offs_d[:, None] * svd, "
                   "mask=kv_ok & d_ok[:, None], other=0.0)",
                   "tl.trans(v_tiles.load([start_n, 0]))"),
        *window.values("start_m * BLOCK_M", "start_n", "BLOCK_M, BLOCK_N"),
        "masked = (start_n < f_start) | (start_n >= f_stop)",
        *_recompute(_dot("q", "k"), score_code, mask, "[:, None]", _dot("do", "v"), d_score,
                    split, "lse2_rows" if split else "lse2", after_ds=tuple(gradient_lines)),
        f"dq = {_dot('dscore.to(k.dtype)', 'tl.trans(k)', 'dq')}",
    ]
    return textwrap.indent("\n".join(lines), " " * 8)


def _row_gradients(gradients) -> list[TensorGradient]:
    """The gradients whose index does not name kv (``slope[h]``, ``bias[q]``): a query row's
    whole sum lands in one place, so the dq pass finishes it per row with delta taken from
    its own P and dP (``_row_gradient_code``)."""
    return [g for g in gradients if not g.relative and "kv" not in ir.names(*g.lookup.indices)]


def _row_gradient_code(gradients, tile: Lowering) -> tuple[str, str]:
    """Accumulators before the dq loop and the atomics after it, for ``_row_gradients``.

    A row's gradient is sum(ds * w) = sum(p * dp * w) - delta * sum(p * w). The loop gathers
    both sums and sum(p * dp), which is the row's exact delta, where the prepared one,
    rowsum(O * dO), carries the rounding of the 16-bit output O. For a table like ALiBi's
    slopes, w grows with the distance q - kv, and that rounding would reach the gradient
    multiplied by it."""
    rows = _row_gradients(gradients)
    if not rows:
        return "    # no per-row tensor gradients", "    # no per-row tensor gradients"
    init = ["g_pdp = tl.zeros([BLOCK_M], dtype=tl.float32)"]
    final = ["if TENSOR_GRADS:",
             "    g_delta = g_pdp",
             "    if HAS_DLSE:",
             "        g_delta -= tl.load(DLSE + off_bh.to(tl.int64) * q_len + q_rows, "
             "mask=row_ok, other=0.0).to(tl.float32)"]
    for i, g in enumerate(gradients):
        if g not in rows:
            continue
        init += [f"g{i}_pw = tl.zeros([BLOCK_M], dtype=tl.float32)",
                 f"g{i}_pdpw = tl.zeros([BLOCK_M], dtype=tl.float32)"]
        final.append(f"    g_rows = tl.where(row_ok, g{i}_pdpw - g_delta * g{i}_pw, 0.0)")
        pointer = _gradient_pointer(g, tile)
        if "q" in ir.names(*g.lookup.indices):
            final.append(f"    tl.atomic_add({pointer}, g_rows[:, None], mask=q_ok)")
        else:
            final.append(f"    tl.atomic_add({pointer}, tl.sum(g_rows, 0))")
    return (textwrap.indent("\n".join(init), " " * 4),
            textwrap.indent("\n".join(final), " " * 4))


def _dkdv_split_terms(split: _SplitBias | None) -> tuple[str, ...]:
    """A dk/dv step's terms of a split bias: B at the anchor (the head may change from step
    to step) and the query rows' part taken out of their log-sum-exp."""
    if split is None:
        return ()
    if split.guarded:
        return (*_corner(split, ""),
                f"lse2 = lse2 - tl.where(sep_ok, {split.row_t}, 0.0) * _LOG2E")
    return (f"sep_aa = {split.corner}", f"lse2 = lse2 - ({split.row_t}) * _LOG2E")


def _dkdv_body(score_code, mask, d_score, split: _SplitBias | None, window: _Window) -> str:
    """One query tile for a key tile, in the [BLOCK_N, BLOCK_M] orientation: k and v stay in
    registers, and dk, dv accumulate as [BLOCK_N, HEAD_DIM]."""
    lines = [
        "start_m = tl.multiple_of(start_m, BLOCK_M)",
        "q_rows_t = start_m + tl.arange(0, BLOCK_M)",
        "q_idx = q_rows_t[None, :]",
        "q_ok = q_idx < q_len",
        "if TMA:",
        "    q_t = tl.trans(q_tiles.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM))",
        "    do = do_tiles.load([g, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)",
        "else:",
        "    q_t = tl.load(q_base + q_idx * sqm + offs_d[:, None] * sqd, "
        "mask=q_ok & d_ok[:, None], other=0.0)",
        "    do = tl.load(do_base + q_rows_t[:, None] * sdm + offs_d[None, :] * sdd, "
        "mask=(q_rows_t[:, None] < q_len) & d_ok[None, :], other=0.0)",
        "if DOT_F32:",
        "    q_t = q_t.to(tl.float32)",
        "    do = do.to(tl.float32)",
        # Whole rows, no mask: the dq pass wrote rows_pad a head (+inf and 0 past q_len).
        "aux_base = AUX + off_bh.to(tl.int64) * (2 * rows_pad)",
        "lse2 = tl.load(aux_base + rows_pad + q_rows_t)",
        "delta = tl.load(aux_base + q_rows_t)",
        *window.values("start_m", "start_n * BLOCK_N", "BLOCK_N, BLOCK_M"),
        "masked = (start_m < f_start) | (start_m >= f_stop)",
        # A separable bias, split where SPLIT_BIAS says (launch.py: it spills registers at
        # D=128).
        *_recompute(_dot("k", "q_t"), score_code, mask,
                    "[None, :]", _dot("v", "tl.trans(do)"), d_score, split,
                    first=_dkdv_split_terms(split),
                    after_p=(f"dv = {_dot('p.to(do.dtype)', 'do', 'dv')}",)),
        f"dk = {_dot('dscore.to(q_t.dtype)', 'tl.trans(q_t)', 'dk')}",
    ]
    return "\n".join(lines)


__all__ = ["KernelSource", "render"]
