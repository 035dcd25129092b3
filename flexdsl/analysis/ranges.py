"""The range of every index expression, in closed form over the lengths and parameters.

For ``bias[h, q - kv + kv_len]`` the second index runs over [1, q_len + kv_len - 1], so ``bias``
needs q_len + kv_len entries along that dimension. Affine indices get exact ranges; others get
sound interval bounds; indices that depend on data (``table[doc[q]]``) get none and are checked
when evaluated. An index of the score needs to be valid only where the mask keeps a position
(both paths read something harmless elsewhere), so with the mask solved for kv its range is
also bounded over the kept positions: ``bias[q - kv] where q >= kv`` spans [0, q_len - 1].

The same intervals bound every integer sub-expression (``value_ranges``), so that a call whose
parameters would overflow the integers it is computed in is refused, and every divisor fixed by
the parameters and lengths, so that a call dividing by zero is too.
"""
from __future__ import annotations

import fractions
import math
from dataclasses import dataclass, field

import sympy
from sympy.printing.pycode import PythonCodePrinter

from .. import ir
from ..check import FLOAT, CheckedSpec
from .bounds import Solved
from .symbolic import N_BATCH, N_HEADS, Symbols, to_sympy


@dataclass(frozen=True)
class IndexRange:
    """Dimension ``dim`` of tensor ``tensor`` is indexed by ``index``, which spans [low, high]."""
    tensor: str
    dim: int
    index: ir.Expr
    low: sympy.Expr | None
    high: sympy.Expr | None
    # The bounds as plain Python functions of named values: no sympy on the call path.
    _evaluate: object = field(default=None, compare=False, repr=False)
    # Over the positions the mask keeps (an index of the score): tighter, and sound while
    # the parameters in ``positive`` are (the mask's bounds were solved dividing by them).
    kept: tuple | None = None
    positive: tuple[str, ...] = ()
    _evaluate_kept: object = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        text = ir.unparse(self.index)
        if self.low is None:
            return f"{self.tensor} dim {self.dim}: {text} depends on data, checked at run time"
        if self.kept is not None:
            low, high = self.kept
            return (f"{self.tensor} dim {self.dim}: {text} in [{low}, {high}] where the mask "
                    f"keeps a position, needs size >= {sympy.simplify(high + 1)}")
        need = sympy.simplify(self.high + 1)
        return (f"{self.tensor} dim {self.dim}: {text} in [{self.low}, {self.high}], "
                f"needs size >= {need}")

    def _uses_kept(self, values) -> bool:
        return self.kept is not None and all(values[n] > 0 for n in self.positive)

    def span(self, values: dict[str, int | float]) -> str:
        """The closed form that ``bounds`` evaluates for these values, as text."""
        low, high = self.kept if self._uses_kept(values) else (self.low, self.high)
        return f"[{low}, {high}]" + (" where the mask keeps a position"
                                     if self._uses_kept(values) else "")

    def bounds(self, values: dict[str, int | float]) -> tuple[int, int] | None:
        """[low, high] for concrete lengths and parameters, or None if data decides."""
        if self.low is None:
            return None
        names, function = self._evaluate_kept if self._uses_kept(values) else self._evaluate
        try:
            low, high = function(*(values[n] for n in names))
        except (OverflowError, ValueError, ZeroDivisionError):
            low = high = math.inf
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"index '{ir.unparse(self.index)}' is not finite here")
        return math.floor(low), math.ceil(high)


@dataclass(frozen=True)
class ValueRange:
    """An integer sub-expression of the spec spans [low, high]; or, with ``divisor``, a
    divisor that depends on no position (``D`` in ``(q - kv) % D``), which must not be 0."""
    node: ir.Expr
    divisor: bool
    division: ir.Expr | None = None    # for a divisor, the division it divides
    _evaluate: object = field(default=None, compare=False, repr=False)

    def bounds(self, values: dict[str, int | float]) -> tuple[float, float]:
        """[low, high] for concrete lengths and parameters; infinite where they overflow."""
        names, function = self._evaluate
        try:
            low, high = function(*(values[n] for n in names))
        except (OverflowError, ValueError, ZeroDivisionError):
            return -math.inf, math.inf
        return float(low), float(high)


def value_ranges(spec: CheckedSpec) -> list[ValueRange]:
    """Each integer sub-expression with sound interval bounds (indices of lookups included,
    lookups themselves not: data decides them), and each divisor fixed per call."""
    symbols = Symbols(spec)
    extents = _extents(symbols)
    roots = [e for e in (spec.spec.score, spec.spec.mask) if e is not None]
    out, seen = [], set()
    for node in (n for root in roots for n in ir.walk(root)):
        divisor = isinstance(node, ir.Binary) and node.op in ("/", "//", "%")
        candidates = []
        if divisor and not (ir.names(node.right) & set(ir.POSITIONS)) \
                and not _has_lookup(node.right) and ir.names(node.right):
            candidates.append((node.right, node))
        if not isinstance(node, (ir.Compare, ir.Lookup)) and not _has_lookup(node) \
                and spec.type_of(node) == "int":
            candidates.append((node, None))
        for candidate, division in candidates:
            if (candidate, division) in seen:
                continue
            seen.add((candidate, division))
            interval = _interval(candidate, symbols, extents)
            if interval is not None:
                out.append(ValueRange(candidate, division is not None, division,
                                      _compile(*interval)))
    return out


@dataclass(frozen=True)
class EvaluatedCheck:
    """What a call on the kernels evaluates before launching (``checked_by_evaluation``): an
    index of ``context`` (a lookup, dimension ``dim``) that no formula bounds, or the divisor
    of ``context`` (an integer division). ``slice_range``: the index is ``t[e]``, ``t`` of rank
    1 and ``e`` bounded by this range, so that the values of a slice of ``t`` bound it."""
    kind: str                 # "index" or "divisor"
    node: ir.Expr             # the index expression, or the divisor
    context: ir.Expr          # the lookup it indexes, or the division it divides
    dim: int = 0
    in_mask: bool = False     # the mask is evaluated at every position, the score where kept
    slice_range: IndexRange | None = None


def checked_by_evaluation(spec: CheckedSpec, ranges) -> tuple[EvaluatedCheck, ...]:
    """What no formula decides and the kernels would get silently wrong: an index with no
    closed-form range (``table[doc[q]]`` reads data; ``bias[q // X]`` divides by a parameter
    of unknown sign), which the kernels clamp; and an integer divisor of positions
    (``q // (kv - 3)``), which gives garbage where it is 0. The PyTorch path raises on both."""
    known = {(r.tensor, r.dim, r.index): r for r in ranges}
    out = []
    for root, in_mask in ((spec.spec.score, False), (spec.spec.mask, True)):
        for node in (ir.walk(root) if root is not None else ()):
            if isinstance(node, ir.Lookup):
                for dim, index in enumerate(node.indices):
                    r = known.get((node.tensor, dim, index))
                    if r is None or r.low is not None:
                        continue
                    inner = (known.get((index.tensor, 0, index.indices[0]))
                             if isinstance(index, ir.Lookup) and len(index.indices) == 1
                             else None)
                    out.append(EvaluatedCheck("index", index, node, dim, in_mask,
                                              inner if inner and inner.low is not None
                                              else None))
            elif isinstance(node, ir.Binary) and node.op in ("//", "%") and (
                    ir.names(node.right) & set(ir.POSITIONS) or _has_lookup(node.right)):
                out.append(EvaluatedCheck("divisor", node.right, node, 0, in_mask))
    return tuple(dict.fromkeys(out))


def index_ranges(spec: CheckedSpec, by_query: Solved | None = None) -> list[IndexRange]:
    """Every (tensor, dimension, index expression) of the spec with its range; with the mask
    solved for kv (``by_query``), an index of the score also with its range where kept."""
    symbols = Symbols(spec)
    extents = _extents(symbols)
    # The mask is evaluated at every position: its own indices must be valid everywhere.
    in_mask = {(n.tensor, dim, index) for n in ir.walk(spec.spec.mask)
               if isinstance(n, ir.Lookup) for dim, index in enumerate(n.indices)
               } if spec.spec.mask is not None else set()
    if by_query is not None and _compares_keys_in_floats(spec):
        # sympy adds float literals exactly, the kernels left to right and in float32:
        # `kv <= q + 0.7 + 0.2 + 0.1` keeps kv = q + 1 at run time for some q, not in sympy.
        by_query = None
    out, seen = [], set()
    for tensor in spec.signature.tensors.values():
        for use in tensor.uses:
            for dim, index in enumerate(use.indices):
                key = (tensor.name, dim, index)
                if key in seen:
                    continue
                seen.add(key)
                low_high = _range(index, symbols, extents)
                low, high = low_high if low_high else (None, None)
                kept = None
                if low_high and by_query is not None and key not in in_mask:
                    kept = _kept_range(index, by_query, symbols, extents)
                    if kept and all(sympy.simplify(a - b) == 0 for a, b in zip(kept, low_high)):
                        kept = None   # no narrower than the whole range
                out.append(IndexRange(
                    tensor.name, dim, index, low, high,
                    _compile(low, high) if low_high else None, kept,
                    by_query.positive if kept else (), _compile(*kept) if kept else None))
    return out


def _compares_keys_in_floats(spec: CheckedSpec) -> bool:
    """Whether a comparison in the mask, which may bound kv, computes in floats."""
    return any(isinstance(n, ir.Compare) and "kv" in ir.names(n)
               and any(spec.type_of(o) == FLOAT for o in n.operands)
               for n in ir.walk(spec.spec.mask))


def _kept_range(index: ir.Expr, solved: Solved, symbols: Symbols, extents) -> tuple | None:
    """Bounds of an index over the positions the mask keeps, or None: an affine index's own
    (``_kept_affine_range``); else interval arithmetic over the index with each affine
    sub-expression's (``bias[min(q - kv, 127)] where q >= kv``: [0, 127])."""
    affine = _kept_affine_range(index, solved, symbols, extents)
    if affine is not None or _has_lookup(index):
        return affine
    interval = _interval(index, symbols, extents,
                         lambda node: _kept_affine_range(node, solved, symbols, extents))
    return None if interval is None else tuple(sympy.simplify(x) for x in interval)


def _kept_affine_range(index: ir.Expr, solved: Solved, symbols: Symbols,
                       extents) -> tuple | None:
    """Bounds of an index affine in q and kv over the positions the mask keeps, or None.

    Each conjunction keeps kv in [max of its lower bounds, min of its upper bounds] (0 and
    kv_len - 1 among them). With an index c + a q + k kv (k > 0), the largest value over a
    conjunction is at most c + a q + k U(q) for each upper bound U; where U is affine in q,
    that is largest at q = 0 or q_len - 1. The least upper bound over the U is sound, and
    exact for a single bound (causal: kv <= q). Bounds with lookups or floors are skipped,
    which only widens the range; so are conditions on rows and sorted-lookup runs."""
    poly = _affine(index, symbols)
    if poly is None:
        return None
    q, kv = symbols[solved.row], symbols[solved.col]
    a, k = poly.coeff_monomial(q), poly.coeff_monomial(kv)
    if k == 0 or not (a.is_number and k.is_number):
        return None
    # The terms other than a q + k kv, over b and h.
    rest = _affine_span(poly, symbols, extents, skip=(solved.row, solved.col))
    if rest is None:
        return None
    rest_low, rest_high = rest
    last_row = symbols[f"{solved.row}_len"] - 1

    def ends(bound):   # a q + k bound(q) at the first and the last row
        f = a * q + k * bound
        return f.subs(q, 0), f.subs(q, last_row)

    lows, highs = [], []
    for c in solved.conjunctions:
        lower = [sympy.Integer(0), *_affine_bounds(c.lower, symbols, q)]
        upper = [symbols[f"{solved.col}_len"] - 1, *_affine_bounds(c.upper, symbols, q)]
        top, bottom = (upper, lower) if k > 0 else (lower, upper)
        highs.append(rest_high + sympy.Min(*(sympy.Max(*ends(b)) for b in top)))
        lows.append(rest_low + sympy.Max(*(sympy.Min(*ends(b)) for b in bottom)))
    return sympy.simplify(sympy.Min(*lows)), sympy.simplify(sympy.Max(*highs))


def _affine_bounds(bounds, symbols: Symbols, row) -> list:
    """The bounds that are affine in the row with no other position and no lookup."""
    out = []
    others = {symbols[n] for n in ir.POSITIONS} - {row}
    for bound in bounds:
        expression = sympy.expand(to_sympy(bound, symbols))
        if symbols.lookups:
            symbols.lookups.clear()
            continue
        if expression.free_symbols & others or not expression.is_polynomial(row):
            continue
        if sympy.Poly(expression, row).degree() <= 1:
            out.append(expression)
    return out


def _extents(symbols: Symbols) -> dict:
    """The range of each position: b, h, q and kv from 0 to their extent less one."""
    return {"b": (0, symbols[N_BATCH] - 1), "h": (0, symbols[N_HEADS] - 1),
            "q": (0, symbols["q_len"] - 1), "kv": (0, symbols["kv_len"] - 1)}


def _range(node: ir.Expr, symbols: Symbols, extents) -> tuple | None:
    poly = _affine(node, symbols)
    span = _affine_span(poly, symbols, extents) if poly is not None else None
    if span is not None:
        return sympy.simplify(span[0]), sympy.simplify(span[1])
    return _interval(node, symbols, extents)


def _affine(node: ir.Expr, symbols: Symbols) -> sympy.Poly | None:
    """``node`` as a polynomial of degree at most 1 in the positions, or None (a lookup, or
    any other form)."""
    expression = sympy.expand(to_sympy(node, symbols))
    if symbols.lookups:
        symbols.lookups.clear()
        return None
    variables = [symbols[n] for n in ir.POSITIONS]
    if not expression.is_polynomial(*variables):
        return None
    poly = sympy.Poly(expression, *variables)
    return poly if poly.total_degree() <= 1 else None


def _affine_span(poly: sympy.Poly, symbols: Symbols, extents, skip=()) -> tuple | None:
    """[low, high] of an affine ``poly`` over the positions' extents, the positions in ``skip``
    left out (taken as 0); None where a coefficient's sign is unknown."""
    variables = [symbols[n] for n in ir.POSITIONS]
    low = high = poly.as_expr().subs({v: 0 for v in variables})
    for name, v in zip(ir.POSITIONS, variables):
        coefficient = poly.coeff_monomial(v)
        if name in skip or coefficient == 0:
            continue
        lo, hi = extents[name]
        if coefficient.is_positive:
            low, high = low + coefficient * lo, high + coefficient * hi
        elif coefficient.is_negative:
            low, high = low + coefficient * hi, high + coefficient * lo
        else:
            return None
    return low, high


_PYTHON = {"Min": min, "Max": max, "floor": math.floor, "ceiling": math.ceil,
           "Fraction": fractions.Fraction, "math": math}


class _ExactPrinter(PythonCodePrinter):
    """Rationals as fractions.Fraction: floor(kv_len/3 + 2/3) at kv_len = 7 is 3, where float
    arithmetic gives floor(2.9999999999999996) = 2, a bound one too low."""

    def _print_Rational(self, expr):
        return f"Fraction({expr.p}, {expr.q})"

    def _print_Half(self, expr):
        return self._print_Rational(expr)


def _compile(low, high):
    """(names, f) with f(*values) == (low, high), as generated Python arithmetic (exact for
    integer values: rationals are fractions)."""
    low, high = sympy.sympify(low), sympy.sympify(high)
    free = sorted({s.name for s in (low.free_symbols | high.free_symbols)})
    function = sympy.lambdify([sympy.Symbol(n) for n in free],
                              (low.subs({s: sympy.Symbol(s.name) for s in low.free_symbols}),
                               high.subs({s: sympy.Symbol(s.name) for s in high.free_symbols})),
                              modules=[_PYTHON, "math"], printer=_ExactPrinter)
    return tuple(free), function


def _has_lookup(node: ir.Expr) -> bool:
    return any(isinstance(n, ir.Lookup) for n in ir.walk(node))


def _interval(node: ir.Expr, symbols: Symbols, extents, known=None) -> tuple | None:
    """Sound interval bounds by structural recursion, for non-affine indices. ``known(node)``
    may give a sub-expression's range first (the range of an affine one where kept)."""
    if known is not None:
        found = known(node)
        if found is not None:
            return found
    if isinstance(node, ir.Num):
        value = sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Float(
            node.value)
        return value, value
    if isinstance(node, ir.Name):
        if node.id in extents:
            return extents[node.id]
        s = symbols[node.id]
        return s, s
    if isinstance(node, ir.Unary) and node.op == "-":
        inner = _interval(node.operand, symbols, extents, known)
        return None if inner is None else (-inner[1], -inner[0])
    if isinstance(node, ir.Binary):
        a = _interval(node.left, symbols, extents, known)
        b = _interval(node.right, symbols, extents, known)
        if a is None or b is None:
            return None
        if node.op == "+":
            return a[0] + b[0], a[1] + b[1]
        if node.op == "-":
            return a[0] - b[1], a[1] - b[0]
        if node.op == "*":
            corners = [x * y for x in a for y in b]
            return sympy.Min(*corners), sympy.Max(*corners)
        if node.op == "//" and b[0] == b[1] and b[0].is_positive:
            return sympy.floor(a[0] / b[0]), sympy.floor(a[1] / b[0])
        if node.op == "%" and b[0] == b[1]:
            # The sign of the divisor's: [0, b - 1] for b > 0, [b + 1, 0] for b < 0.
            return sympy.Min(0, b[0] + 1), sympy.Max(0, b[0] - 1)
        if node.op == "**" and isinstance(node.right, ir.Num) and isinstance(
                node.right.value, int) and node.right.value >= 0:
            n = node.right.value
            if n % 2:   # odd: increasing
                return a[0] ** n, a[1] ** n
            return sympy.Integer(0), sympy.Max(a[0] ** n, a[1] ** n)
        return None
    if isinstance(node, ir.Call):
        args = [_interval(a, symbols, extents, known) for a in node.args]
        if any(a is None for a in args):
            return None
        if node.func == "abs":
            (lo, hi), = args
            return sympy.Max(0, lo, -hi), sympy.Max(-lo, hi)
        if node.func in ("min", "max"):
            f = sympy.Min if node.func == "min" else sympy.Max
            return f(*(a[0] for a in args)), f(*(a[1] for a in args))
        if node.func == "clamp":
            # min(max(x, lo), hi), each bound through both: x entirely above hi gives hi,
            # not an interval whose low passes its high.
            (x_lo, x_hi), (lo_lo, lo_hi), (hi_lo, hi_hi) = args
            return (sympy.Min(sympy.Max(x_lo, lo_lo), hi_lo),
                    sympy.Min(sympy.Max(x_hi, lo_hi), hi_hi))
        return None
    if isinstance(node, ir.IfElse):
        a = _interval(node.then, symbols, extents, known)
        b = _interval(node.orelse, symbols, extents, known)
        if a is None or b is None:
            return None
        return sympy.Min(a[0], b[0]), sympy.Max(a[1], b[1])
    return None
