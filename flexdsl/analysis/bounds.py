"""The mask solved for one position variable: per-row bounds, in closed form.

The mask is put in disjunctive normal form over its comparisons. In each conjunction, every
comparison that can be solved for the column variable (``kv`` when rows are queries, ``q`` when
rows are keys) becomes a lower or an upper bound on it, written as an expression of the row
variable, the lengths and the parameters::

    0 <= q - kv < W     ->   kv >= q - W + 1,  kv <= q

Solvable means ``beta * col + A(row) OP 0`` or ``beta * (col // C) + A(row) OP 0`` with integer
``beta`` and a positive integer literal ``C``; ``A`` may be anything without the column variable,
lookups of the row variable included. Comparisons that mention only the row variable filter
rows. Sorted lookups ``doc[q] == doc[kv]`` give a per-row range read from two O(S) tensors made
at call time. Everything else is *residual*: the mask is still evaluated for it, and the
reason is kept so ``flexdsl check`` can say why a tile stays PARTIAL.

Bounds are IR expressions, so they print in the spec's own language and run through the same
evaluators (torch for plans, Triton for kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from ..check import INT, CheckedSpec
from .symbolic import Symbols, to_ir, to_sympy

# Above this many conjunctions the analysis gives up (soundly: the whole mask is residual).
MAX_CONJUNCTIONS = 16

_FLIP = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}


@dataclass(frozen=True)
class Documents:
    """``T[..., row] == T[..., col]``: when T is sorted, col lies in the run of T[..., row].

    ``lower`` and ``upper`` are lookups of two derived tensors (``T__lo_kv``, ``T__hi_kv`` for
    rows that are queries) that the call fills in O(S); ``tensor`` and ``lead`` say how.
    """
    tensor: str
    lead: tuple[ir.Expr, ...]   # indices before the position (e.g. b), the same on both sides
    lower: ir.Lookup
    upper: ir.Lookup


@dataclass(frozen=True)
class Conjunction:
    """One term of the mask's DNF, solved for the column variable."""
    lower: tuple[ir.Expr, ...]          # col >= each
    upper: tuple[ir.Expr, ...]          # col <= each
    rows: tuple[ir.Expr, ...]           # conditions on the row alone
    documents: tuple[Documents, ...]
    residual: tuple[tuple[ir.Expr, str], ...]   # (comparison, why it is not a bound)

    monotone: bool = False   # every bound and row condition moves one way with the row

    @property
    def exact(self) -> bool:
        """Whether the bounds alone decide the conjunction (then FULL tiles need no mask)."""
        return not self.residual


@dataclass(frozen=True)
class Solved:
    """The mask solved for ``col`` with rows indexed by ``row``."""
    row: str
    col: str
    conjunctions: tuple[Conjunction, ...]
    positive: tuple[str, ...] = ()   # parameters that must be > 0 for the bounds to hold

    @property
    def exact(self) -> bool:
        return all(c.exact for c in self.conjunctions)

    def describe(self, values: dict | None = None, spec: CheckedSpec | None = None) -> list[str]:
        """One line per conjunction (``kv in [q - W + 1, q]``), its residual conditions with
        the reason, and with ``values`` the same bounds with those parameters substituted."""
        lines = []
        for i, c in enumerate(self.conjunctions):
            low = _combine("max", c.lower + tuple(d.lower for d in c.documents))
            high = _combine("min", c.upper + tuple(d.upper for d in c.documents))
            low_text = "0" if low is None else ir.unparse(low)
            high_text = f"{self.col}_len - 1" if high is None else ir.unparse(high)
            head = "or " if i else ""
            line = f"{head}{self.col} in [{low_text}, {high_text}]"
            if c.rows:
                line += " when " + " and ".join(ir.unparse(r) for r in c.rows)
            lines.append(line)
            if values and spec is not None:
                known = {k: v for k, v in values.items() if k in spec.signature.params}
                if known and (low is not None or high is not None):
                    low_v = "0" if low is None else _substitute(low, known, spec)
                    high_v = (f"{self.col}_len - 1" if high is None
                              else _substitute(high, known, spec))
                    bound = ", ".join(f"{k}={v}" for k, v in known.items())
                    lines.append(f"    with {bound}: {self.col} in [{low_v}, {high_v}]")
            for d in c.documents:
                lines.append(f"    {d.lower.tensor} and {d.upper.tensor}: the run of "
                             f"{d.tensor} holding {self.row} (exact when {d.tensor} is sorted)")
            for atom, why in c.residual:
                lines.append(f"    partial: {ir.unparse(atom)}: {why}")
        return lines


def tile_ranges(solved: Solved, spec: CheckedSpec) -> list[str]:
    """The per-row bounds at tile level, in closed form, for a tile of rows [r0, r0 + T).

    Every bound here is monotone in the row (an integer multiple of it, or of ``row // C``,
    plus terms free of it), so its extremes over a tile sit at the tile's two ends: the tile
    touches [min of the lower bound, max of the upper bound] and keeps every column of
    [max of the lower bound, min of the upper bound].
    """
    symbols = Symbols(spec)
    row = symbols[solved.row]
    start = sympy.Symbol(f"{solved.row}0", integer=True, nonnegative=True)
    size = sympy.Symbol("T", integer=True, positive=True)
    ends = (start, start + size - 1)
    col_len = symbols[f"{solved.col}_len"]
    lines = []
    for c in solved.conjunctions:
        if c.documents or any(_has_lookup(b) for b in c.lower + c.upper):
            lines.append("  (per row, from the runs of the lookup: no tile formula)")
            continue
        lows = [to_sympy(b, symbols) for b in c.lower] or [sympy.Integer(0)]
        highs = [to_sympy(b, symbols) for b in c.upper] or [col_len - 1]
        at = [[sympy.Max(*lows).subs(row, e) for e in ends],
              [sympy.Min(*highs).subs(row, e) for e in ends]]
        touched = (sympy.Min(*at[0]), sympy.Max(*at[1]))
        full = (sympy.Max(*at[0]), sympy.Min(*at[1]))
        text = [ir.unparse(to_ir(sympy.simplify(x), symbols)) for x in (*touched, *full)]
        line = f"  touches {solved.col} in [{text[0]}, {text[1]}]"
        if c.exact:
            line += f", keeps all of [{text[2]}, {text[3]}]"
        if c.rows:
            line += " for rows where " + " and ".join(ir.unparse(r) for r in c.rows)
        lines.append(line.replace(f"{solved.row}0", f"{solved.row}0"))
    return lines


def _has_lookup(node: ir.Expr) -> bool:
    return any(isinstance(n, ir.Lookup) for n in ir.walk(node))


def _substitute(node: ir.Expr, values: dict, spec: CheckedSpec) -> str:
    symbols = Symbols(spec)
    expression = to_sympy(node, symbols).subs({symbols[k]: v for k, v in values.items()})
    return ir.unparse(to_ir(sympy.simplify(expression), symbols))


def _combine(func: str, parts: tuple[ir.Expr, ...]) -> ir.Expr | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return ir.Call(func, parts)


def solve(spec: CheckedSpec, row: str, col: str) -> Solved:
    """Solve the mask of ``spec`` for ``col`` ("kv" or "q"), rows indexed by ``row``."""
    if spec.spec.mask is None:
        return Solved(row, col, (Conjunction((), (), (), (), ()),))
    terms = _dnf(spec.spec.mask, spec, negate=False)
    if terms is None:
        reason = f"more than {MAX_CONJUNCTIONS} alternatives after expanding 'or'"
        whole = Conjunction((), (), (), (), ((spec.spec.mask, reason),))
        return Solved(row, col, (whole,))
    solver = _Solver(spec, row, col)
    conjunctions = tuple(solver.conjunction(t) for t in terms)
    return Solved(row, col, conjunctions, tuple(sorted(solver.positive)))


# ----------------------------------------------------------------------------------------------
# Disjunctive normal form over single comparisons.

def _dnf(node: ir.Expr, spec: CheckedSpec, negate: bool) -> list[list[ir.Expr]] | None:
    if isinstance(node, ir.Unary) and node.op == "not":
        return _dnf(node.operand, spec, not negate)
    if isinstance(node, ir.Binary) and node.op in ("and", "or"):
        left, right = _dnf(node.left, spec, negate), _dnf(node.right, spec, negate)
        if left is None or right is None:
            return None
        conjunctive = (node.op == "and") != negate
        if conjunctive:
            out = [a + b for a in left for b in right]
        else:
            out = left + right
        return out if len(out) <= MAX_CONJUNCTIONS else None
    if isinstance(node, ir.Compare):
        pairs = [(node.operands[i], op, node.operands[i + 1]) for i, op in enumerate(node.ops)]
        if negate:  # not (a < b < c) == a >= b or b >= c
            out = []
            for a, op, b in pairs:
                out.extend(_atom(a, _FLIP[op], b, spec))
            return out if len(out) <= MAX_CONJUNCTIONS else None
        out = [[]]
        for a, op, b in pairs:
            out = [c + d for c in out for d in _atom(a, op, b, spec)]
        return out if len(out) <= MAX_CONJUNCTIONS else None
    if isinstance(node, ir.IfElse):  # (test and then) or (not test and orelse)
        expanded = ir.Binary("or", ir.Binary("and", node.test, node.then),
                             ir.Binary("and", ir.Unary("not", node.test), node.orelse))
        return _dnf(expanded, spec, negate)
    raise TypeError(f"not a condition: {ir.unparse(node)}")


def _atom(a: ir.Expr, op: str, b: ir.Expr, spec: CheckedSpec) -> list[list[ir.Expr]]:
    """One comparison as DNF; integer ``!=`` splits into ``<`` or ``>`` so each side bounds,
    and ``abs(x) <= w`` becomes ``x <= w and -x <= w`` (``>=``: ``x >= w or -x >= w``)."""
    if _is_abs(b) and not _is_abs(a):
        a, op, b = b, _MIRROR[op], a
    if _is_abs(a) and op in ("<", "<=", ">", ">="):
        x = a.args[0]
        pair = [ir.Compare((x, b), (op,)), ir.Compare((ir.Unary("-", x), b), (op,))]
        return [pair] if op in ("<", "<=") else [[pair[0]], [pair[1]]]
    if op == "!=" and spec.type_of(a) == INT and spec.type_of(b) == INT:
        return [[ir.Compare((a, b), ("<",))], [ir.Compare((a, b), (">",))]]
    return [[ir.Compare((a, b), (op,))]]


# ----------------------------------------------------------------------------------------------

class _Solver:
    def __init__(self, spec: CheckedSpec, row: str, col: str):
        self.spec = spec
        self.row, self.col = row, col
        self.symbols = Symbols(spec)
        self.positive: set[str] = set()   # parameters the bounds divide by

    def conjunction(self, atoms: list[ir.Compare]) -> Conjunction:
        lower, upper, rows, documents, residual = [], [], [], [], []
        for atom in atoms:
            kind, payload = self.atom(atom)
            if kind == "bounds":
                lows, highs = payload
                lower.extend(lows)
                upper.extend(highs)
            elif kind == "row":
                rows.append(self.without_column(atom))
            elif kind == "documents":
                documents.append(payload)
            else:
                residual.append((atom, payload))
        lower, upper, rows = tuple(_unique(lower)), tuple(_unique(upper)), tuple(_unique(rows))
        monotone = not documents and all(self.monotone(b) for b in lower + upper) and all(
            r.ops[0] not in ("==", "!=") and self.monotone(ir.Binary("-", *r.operands))
            for r in rows)
        return Conjunction(lower, upper, rows, tuple(documents), tuple(residual), monotone)

    def monotone(self, node: ir.Expr) -> bool:
        """Whether ``node`` only rises, or only falls, with the row variable: a sum of terms
        free of it and of ``c * row`` or ``c * (row // C)`` with one sign of ``c``."""
        if any(isinstance(n, ir.Lookup) for n in ir.walk(node)):
            return False
        row = self.symbols[self.row]
        self.symbols.lookups.clear()
        directions = set()
        for term in sympy.Add.make_args(sympy.expand(to_sympy(node, self.symbols))):
            if not term.has(row):
                continue
            factor, dependent = term.as_independent(row, as_Mul=True)
            sign = _sign(factor, self.positive)
            if sign is None:
                return False
            if dependent == row:
                directions.add(sign)
            elif (isinstance(dependent, sympy.floor)
                  and _floor_divisor(dependent.args[0], row) is not None
                  and (isinstance(_floor_divisor(dependent.args[0], row), int)
                       or str(_floor_divisor(dependent.args[0], row)) in self.positive)):
                directions.add(sign)
            else:
                return False
        return len(directions) <= 1

    def atom(self, atom: ir.Compare):
        (a, b), (op,) = atom.operands, atom.ops
        uses_col = self.mentions(atom, self.col) and not self.cancels(a, b)
        if not uses_col:
            if self.lookup_mentions(atom, self.row) or not self.lookup_free(atom):
                # Row filters with data in them are fine per row, but keep it simple and sound.
                return "residual", "a lookup decides it; evaluated as a mask"
            return "row", None
        documents = self.documents(a, op, b)
        if documents is not None:
            return "documents", documents
        if any(isinstance(n, ir.Lookup) and self.mentions(n, self.col) for n in ir.walk(atom)):
            return "residual", (f"a lookup indexed by {self.col} is not a range of "
                                f"{self.col} (only sorted 'T[{self.row}] == T[{self.col}]' is)")
        if self.spec.type_of(a) != INT or self.spec.type_of(b) != INT:
            try:
                return self.isolate(a, op, b)
            except _NotSolvable as why:
                return "residual", str(why)
        try:
            return self.isolate(a, op, b)
        except _NotSolvable as why:
            return "residual", str(why)

    def without_column(self, atom: ir.Compare) -> ir.Compare:
        """A row condition that names the column only to cancel it, rewritten without it."""
        if not self.mentions(atom, self.col):
            return atom
        (a, b), (op,) = atom.operands, atom.ops
        self.symbols.lookups.clear()
        difference = sympy.expand(to_sympy(a, self.symbols) - to_sympy(b, self.symbols))
        return ir.Compare((to_ir(difference, self.symbols), ir.Num(0)), (op,))

    def cancels(self, a: ir.Expr, b: ir.Expr) -> bool:
        """Whether the column variable vanishes from ``a - b`` (``0 * kv``, ``kv - kv``)."""
        if not (self.lookup_free(a) and self.lookup_free(b)):
            return False
        self.symbols.lookups.clear()
        difference = sympy.expand(to_sympy(a, self.symbols) - to_sympy(b, self.symbols))
        return not difference.has(self.symbols[self.col])

    def mentions(self, node: ir.Expr, name: str) -> bool:
        return name in ir.names(node)

    def lookup_mentions(self, node: ir.Expr, name: str) -> bool:
        return any(isinstance(n, ir.Lookup) and self.mentions(n, name) for n in ir.walk(node))

    def lookup_free(self, node: ir.Expr) -> bool:
        return not any(isinstance(n, ir.Lookup) for n in ir.walk(node))

    def documents(self, a: ir.Expr, op: str, b: ir.Expr) -> Documents | None:
        if op != "==" or not (isinstance(a, ir.Lookup) and isinstance(b, ir.Lookup)):
            return None
        if a.tensor != b.tensor or len(a.indices) != len(b.indices):
            return None
        *lead_a, last_a = a.indices
        *lead_b, last_b = b.indices
        if lead_a != lead_b or any(self.mentions(i, "q") or self.mentions(i, "kv")
                                   for i in lead_a):
            return None
        ends = {last_a, last_b}
        if ends != {ir.Name(self.row), ir.Name(self.col)}:
            return None
        lead = tuple(lead_a)
        row_index = (*lead, ir.Name(self.row))
        lower = ir.Lookup(f"{a.tensor}__lo_{self.col}", row_index)
        upper = ir.Lookup(f"{a.tensor}__hi_{self.col}", row_index)
        return Documents(a.tensor, lead, lower, upper)

    def isolate(self, a: ir.Expr, op: str, b: ir.Expr):
        """``a OP b`` as bounds on the column variable."""
        col = self.symbols[self.col]
        self.symbols.lookups.clear()
        expression = sympy.expand(to_sympy(a, self.symbols) - to_sympy(b, self.symbols))
        rest, part = expression.as_independent(col, as_Add=True)
        beta, unit = part.as_coeff_Mul()
        scale = 1
        if unit == col:
            pass
        elif isinstance(unit, sympy.floor) and _floor_divisor(unit.args[0], col) is not None:
            scale = _floor_divisor(unit.args[0], col)
            if isinstance(scale, sympy.Symbol):
                self.positive.add(str(scale))
        elif any(isinstance(t, sympy.Mod) and t.has(col) for t in sympy.preorder_traversal(part)):
            raise _NotSolvable(f"'%' of {self.col} repeats along the row, so the kept keys "
                               f"are no single range; the mask decides")
        else:
            raise _NotSolvable(f"not of the form a*{self.col} + f({self.row}) "
                               f"or a*({self.col} // C) + f({self.row}) with integer a and a "
                               f"positive literal C")
        if not (beta.is_Integer and beta != 0):
            raise _NotSolvable(f"the coefficient of {self.col} is {beta}, not a nonzero integer")
        if op in ("!=",):
            raise _NotSolvable("'!=' of floats is not a range")
        if beta < 0:
            beta, rest, op = -beta, -rest, _MIRROR[op]
        # beta * unit + rest OP 0 -> unit OP -rest / beta
        target = -rest / beta
        lows, highs = [], []
        if op in (">=", "=="):
            lows.append(sympy.ceiling(target))
        if op == ">":
            lows.append(sympy.floor(target) + 1)
        if op in ("<=", "=="):
            highs.append(sympy.floor(target))
        if op == "<":
            highs.append(sympy.ceiling(target) - 1)
        if scale != 1:  # bounds on col // C -> bounds on col
            lows = [scale * t for t in lows]
            highs = [scale * t + scale - 1 for t in highs]
        lows = [to_ir(sympy.expand(t) if t.is_Add else t, self.symbols) for t in lows]
        highs = [to_ir(sympy.expand(t) if t.is_Add else t, self.symbols) for t in highs]
        return "bounds", (lows, highs)


def work_trend(solved: Solved, spec: CheckedSpec) -> int:
    """+1 when later rows tend to keep more columns (causal), -1 when fewer, 0 when neither
    or unknown. Kernels start the heavy row tiles first so that the last wave is short.

    Each conjunction adds the slope of its tightest upper bound minus that of its tightest
    lower bound (see ``_slopes``).
    """
    total = sum(upper - lower for lower, upper in _slopes(solved, spec))
    return (total > 0) - (total < 0)


def banded(solved: Solved, spec: CheckedSpec) -> bool:
    """Whether every row keeps a window of one width that slides with it (sliding windows,
    dilated and neighbourhood masks): each conjunction's tightest lower and upper bounds rise
    with the row at the same rate. Such masks waste less work at the window's edges in
    narrower row tiles."""
    slopes = _slopes(solved, spec)
    return bool(slopes) and all(lower == upper > 0 for lower, upper in slopes)


def _slopes(solved: Solved, spec: CheckedSpec) -> list[tuple[float, float]]:
    """Per conjunction, the slopes along the row of its tightest lower and upper bounds (0
    where there is none), read with ``row // C`` taken as ``row / C``; bounds with lookups or
    parameters in their slope count as flat."""
    symbols = Symbols(spec)
    row = symbols[solved.row]

    def slope(bound: ir.Expr) -> float:
        if any(isinstance(n, ir.Lookup) for n in ir.walk(bound)):
            return 0.0
        expr = to_sympy(bound, symbols).replace(sympy.floor, lambda x: x)
        value = sympy.diff(expr, row)
        return float(value) if value.is_number else 0.0

    return [(max((slope(b) for b in c.lower), default=0.0),
             min((slope(b) for b in c.upper), default=0.0)) for c in solved.conjunctions]


def _sign(factor, positive: set[str]) -> int | None:
    """+1 or -1 for a product of numbers and parameters known to be positive, else None."""
    sign = 1
    for part in sympy.Mul.make_args(factor):
        if part.is_number:
            if part == 0:
                return None
            sign *= 1 if part > 0 else -1
        elif isinstance(part, sympy.Symbol) and str(part) in positive:
            continue
        else:
            return None
    return sign


def _is_abs(node: ir.Expr) -> bool:
    return isinstance(node, ir.Call) and node.func == "abs"


class _NotSolvable(Exception):
    pass


def _floor_divisor(argument, col):
    """C when ``argument`` is ``col / C`` for a positive integer literal or an int parameter
    (which the call must then pass positive); else None."""
    factor, unit = argument.as_independent(col, as_Mul=True)
    if unit != col:
        return None
    divisor = 1 / factor
    if divisor.is_Integer and divisor > 1:
        return int(divisor)
    if isinstance(divisor, sympy.Symbol) and divisor.is_integer:
        return divisor
    return None


def _unique(items):
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
