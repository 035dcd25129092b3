"""Tile plans: which (query tile, key tile) pairs are EMPTY, FULL or PARTIAL.

Built from the per-row bounds of ``bounds.solve``: evaluating them costs O(rows), never
O(Sq x Skv). Two views come from the same rows:

- ``kv_ranges`` / ``q_ranges``: per tile, the hull of the keys it touches and one range that is
  fully kept, the very formulas the kernels compute for themselves (cheap, sound);
- ``tiles()``: the exact tile matrix, by counting per tile how many rows touch or cover it
  (exact whenever the mask is fully captured by bounds; sound otherwise).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .. import eager
from ..check import CheckedSpec
from ..errors import SpecCallError
from .bounds import Solved, solve

EMPTY, PARTIAL, FULL = 0, 1, 2
SYMBOLS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}


@dataclass(frozen=True)
class MaskAnalysis:
    """The mask solved both ways: key bounds per query (forward, dq) and query bounds per key
    (dk, dv)."""
    spec: CheckedSpec
    by_query: Solved
    by_key: Solved

    @classmethod
    def of(cls, spec: CheckedSpec) -> "MaskAnalysis":
        return cls(spec, solve(spec, "q", "kv"), solve(spec, "kv", "q"))

    @functools.cached_property
    def has_documents(self) -> bool:
        """Whether calls must build run tensors for sorted lookups."""
        return any(c.documents for s in (self.by_query, self.by_key) for c in s.conjunctions)

    def describe(self) -> list[str]:
        return ["key range per query:", *("  " + l for l in self.by_query.describe()),
                "query range per key:", *("  " + l for l in self.by_key.describe())]


def document_tensors(solved: Solved, tensors: Mapping[str, torch.Tensor], q_len: int,
                     kv_len: int) -> tuple[dict[str, torch.Tensor], bool]:
    """The O(S) run tensors that sorted lookups need, and whether every such tensor was sorted.

    For ``doc[q] == doc[kv]`` solved for kv: ``doc__lo_kv[q]`` is the first and ``doc__hi_kv[q]``
    the last key holding ``doc[q]``. An unsorted tensor gets the whole range instead, which is
    sound, and makes the plan treat the comparison as a mask.
    """
    out, exact = {}, True
    row_len, col_len = (q_len, kv_len) if solved.row == "q" else (kv_len, q_len)
    for conjunction in solved.conjunctions:
        for d in conjunction.documents:
            if d.lower.tensor in out:
                continue
            table = tensors[d.tensor]
            # Training loops pass the same ids many times: reuse the runs (and skip the sync
            # of the sortedness check) until the tensor is written to.
            # Keyed by identity (a weak reference: a new tensor may reuse a freed address)
            # and by version (an in-place write changes it).
            # An inference tensor keeps no version: its runs are made every call.
            key = (None if table.is_inference() else
                   (d.lower.tensor, id(table), table._version, row_len, col_len))
            cached = _runs.get(key)
            if cached is not None and cached[3]() is table:
                low, high, ordered, _ = cached
                out[d.lower.tensor], out[d.upper.tensor] = low, high
                exact = exact and ordered
                continue
            cols = table[..., :col_len].contiguous()
            rows = table[..., :row_len].contiguous()
            ordered = bool((cols[..., 1:] >= cols[..., :-1]).all()) if col_len > 1 else True
            if ordered and row_len == col_len:
                low, high = _runs_of(cols)
            elif ordered:
                low = torch.searchsorted(cols, rows, right=False)
                high = torch.searchsorted(cols, rows, right=True) - 1
            else:
                exact = False
                low = torch.zeros_like(rows, dtype=torch.int64)
                high = torch.full_like(rows, col_len - 1, dtype=torch.int64)
            out[d.lower.tensor] = low.to(torch.int32 if table.is_cuda else torch.int64)
            out[d.upper.tensor] = high.to(out[d.lower.tensor].dtype)
            if key is not None:
                if len(_runs) > 64:
                    _runs.clear()
                _runs[key] = (out[d.lower.tensor], out[d.upper.tensor], ordered,
                              weakref.ref(table))
    return out, exact


_runs: dict[tuple, tuple] = {}


def _runs_of(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted ``ids`` (along the last dim), the first and last index of each position's
    run, in O(S): where a run starts, carried forward; where it ends, carried backward."""
    n = ids.shape[-1]
    index = torch.arange(n, device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    low = torch.where(starts, index, 0).cummax(-1).values
    high = n - 1 - torch.where(ends, n - 1 - index, 0).flip(-1).cummax(-1).values.flip(-1)
    return low, high


def check_positive(solved: Solved, values: Mapping[str, float], spec: CheckedSpec) -> None:
    for name in solved.positive:
        if values[name] <= 0:
            raise SpecCallError(
                f"parameter '{name}' must be positive: positions are divided by it",
                spec=spec.text, span=spec.signature.params[name].span,
                hint=f"pass {name} >= 1")


def _grid(solved: Solved, spec: CheckedSpec, rows: torch.Tensor, *, q_len: int, kv_len: int,
          batch: int, heads: int, values: Mapping[str, float],
          tensors: Mapping[str, torch.Tensor]) -> eager.Grid:
    """Positions with the row variable set to ``rows`` (1-D), for evaluating bounds.

    Bounds never mention the column variable, so it gets no grid (at 128k tokens building
    one would cost more than the whole plan)."""
    device = rows.device
    positions = {
        "b": torch.arange(batch, device=device).view(-1, 1, 1, 1),
        "h": torch.arange(heads, device=device).view(1, -1, 1, 1),
        solved.row: rows.view(1, 1, -1, 1),
        "q_len": torch.tensor(q_len, device=device),
        "kv_len": torch.tensor(kv_len, device=device),
    }
    params = {k: v for k, v in values.items() if k in spec.signature.params}
    return eager.Grid(positions, params, tensors, torch.float64, None, spec.text)


def _parts(conjunction, grid: eager.Grid, n_rows: int, cols: int, device):
    """A conjunction's [low, high] per row before its row conditions, and those conditions."""
    shape = (1, 1, n_rows)
    low = torch.zeros(shape, dtype=torch.int64, device=device)
    high = torch.full(shape, cols - 1, dtype=torch.int64, device=device)
    for bound in conjunction.lower + tuple(d.lower for d in conjunction.documents):
        low = torch.maximum(low, _rows(eager.evaluate(bound, grid)))
    for bound in conjunction.upper + tuple(d.upper for d in conjunction.documents):
        high = torch.minimum(high, _rows(eager.evaluate(bound, grid)))
    conditions = [_rows(eager.evaluate(c, grid)) for c in conjunction.rows]
    low, high, *conditions = torch.broadcast_tensors(low, high, *conditions)
    return low, high, conditions


def row_intervals(solved: Solved, spec: CheckedSpec, *, rows: int, cols: int, batch: int,
                  heads: int, values: Mapping[str, float],
                  tensors: Mapping[str, torch.Tensor], documents_exact: bool = True):
    """Per conjunction and row, the interval [low, high] of columns its bounds allow.

    Returns ``low``, ``high`` of shape (m, B', H', R) (B', H' are 1 unless bounds depend on b
    or h; an empty interval has low > high) and, per conjunction, whether it is exact.
    """
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    q_len, kv_len = (rows, cols) if solved.row == "q" else (cols, rows)
    grid = _grid(solved, spec, torch.arange(rows, device=device), q_len=q_len, kv_len=kv_len,
                 batch=batch, heads=heads, values=values, tensors=tensors)
    lows, highs, exact = [], [], []
    for c in solved.conjunctions:
        low, high, conditions = _parts(c, grid, rows, cols, device)
        for keep in conditions:
            high = torch.where(keep, high, torch.tensor(-1, device=device))
            low = torch.where(keep, low, torch.tensor(cols, device=device))
        low, high = torch.broadcast_tensors(low, high)
        lows.append(low)
        highs.append(high)
        exact.append(c.exact and (documents_exact or not c.documents))
    if not lows:  # the mask is never true
        lows = [torch.full((1, 1, rows), cols, dtype=torch.int64, device=device)]
        highs = [torch.full((1, 1, rows), -1, dtype=torch.int64, device=device)]
        exact = [True]
    return _stack(lows), _stack(highs), tuple(exact)


def _rows(value: torch.Tensor) -> torch.Tensor:
    """A bound evaluated on a (B, H, R, 1) grid -> (B', H', R), floats floored/ceiled already."""
    value = torch.as_tensor(value)
    if value.is_floating_point():
        value = value.clamp(-2**62, 2**62).to(torch.int64)
    while value.dim() < 4:
        value = value.unsqueeze(0)
    return value[..., 0] if value.shape[-1] == 1 else value.amax(-1)


def _stack(items):
    items = torch.broadcast_tensors(*items)
    return torch.stack(items)


@dataclass
class TilePlan:
    """The tile plan of one spec for given lengths, tile sizes, parameters and tensors.

    Per-tile ranges come from closed-form bounds evaluated at each tile's two end rows when
    every bound is monotone in the row (O(tiles)), else from every row (O(rows)). The exact
    tile matrix always evaluates every row.
    """
    analysis: MaskAnalysis
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    batch: int
    heads: int
    values: dict
    tensors: dict            # the call's tensors and the run tensors of sorted lookups
    documents_exact: bool

    @property
    def solved(self) -> Solved:
        return self.analysis.by_query

    @property
    def q_tiles(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def kv_tiles(self) -> int:
        return -(-self.kv_len // self.block_n)

    @functools.cached_property
    def _rows(self):
        return row_intervals(self.solved, self.analysis.spec, rows=self.q_len, cols=self.kv_len,
                             batch=self.batch, heads=self.heads, values=self.values,
                             tensors=self.tensors, documents_exact=self.documents_exact)

    @property
    def low(self) -> torch.Tensor:
        """(m, B', H', Sq): per conjunction, the first key each query may keep."""
        return self._rows[0]

    @property
    def high(self) -> torch.Tensor:
        """(m, B', H', Sq): per conjunction, the last key each query may keep."""
        return self._rows[1]

    @property
    def exact(self) -> tuple[bool, ...]:
        if not self.solved.conjunctions:
            return (True,)
        return tuple(c.exact and (self.documents_exact or not c.documents)
                     for c in self.solved.conjunctions)

    # -- the kernel's view: per query tile, a hull and one fully kept range -----------------

    def tile_ranges(self) -> torch.Tensor:
        """Per query tile, (lo, hi, full_lo, full_hi) as an (n_q_tiles, 4) int64 tensor.

        Keys [lo, hi] hold every kept position of the tile; keys [full_lo, full_hi] are kept
        by each of its rows (empty when full_lo > full_hi): the kernels' own reduction.
        """
        conjunctions = self.solved.conjunctions
        if conjunctions and all(c.monotone for c in conjunctions):
            parts = self._ends()
        else:
            parts = [tuple(x.cpu().numpy() for x in p) for p in self._every_row()]
        # Per-tile vectors are short: NumPy's elementwise calls cost a fraction of torch's.
        lo = functools.reduce(np.minimum, [p[0] for p in parts])
        hi = functools.reduce(np.maximum, [p[1] for p in parts])
        best_lo = np.ones_like(lo)
        best_hi = np.zeros_like(hi)
        for (_, _, full_lo, full_hi), exact in zip(parts, self.exact):
            if exact:
                best_lo, best_hi = _merge_full(best_lo, best_hi, full_lo, full_hi, np)
        return torch.from_numpy(np.stack([lo, hi, best_lo, best_hi], axis=1))

    def _ends(self):
        """(touch_lo, touch_hi, full_lo, full_hi) per conjunction from each tile's end rows.

        Each bound is monotone, so its extremes over a tile sit at the tile's ends. The full
        range is exact: the largest lower and smallest upper bound at either end. The hull
        takes each bound's own extreme before combining (max over bounds of each one's
        smallest end, min over bounds of each one's largest end): combining first would be
        wrong when bounds move in opposite directions (``min(1 - q, q - 1)`` peaks inside the
        tile). A monotone condition holds on a prefix or a suffix, so it holds for some row of
        a tile when it holds at one end (sound) and for all when at both (exact).
        """
        starts = torch.arange(0, self.q_len, self.block_m)
        ends = torch.clamp(starts + self.block_m - 1, max=self.q_len - 1)
        rows = torch.cat([starts, ends])
        n = len(starts)
        grid = _grid(self.solved, self.analysis.spec, rows, q_len=self.q_len,
                     kv_len=self.kv_len, batch=self.batch, heads=self.heads,
                     values=self.values, tensors=self.tensors)

        def at_ends(bound):
            """The bound at every tile's first and last row, as NumPy (B', H', tiles)."""
            value = _rows(eager.evaluate(bound, grid))   # (B', H', rows or 1)
            value = value.expand(value.shape[0], value.shape[1], len(rows)).cpu().numpy()
            return value[..., :n], value[..., n:]

        def low_over_bh(value):
            return value.min(axis=(0, 1))

        def high_over_bh(value):
            return value.max(axis=(0, 1))

        out = []
        zeros = np.zeros(n, dtype=np.int64)
        last = np.full(n, self.kv_len - 1, dtype=np.int64)
        for c in self.solved.conjunctions:
            touch_lo, full_lo, touch_hi, full_hi = zeros, zeros, last, last
            for bound in c.lower:
                a, b = at_ends(bound)
                touch_lo = np.maximum(touch_lo, low_over_bh(np.minimum(a, b)))
                full_lo = np.maximum(full_lo, high_over_bh(np.maximum(a, b)))
            for bound in c.upper:
                a, b = at_ends(bound)
                touch_hi = np.minimum(touch_hi, high_over_bh(np.maximum(a, b)))
                full_hi = np.minimum(full_hi, low_over_bh(np.minimum(a, b)))
            some = np.ones(n, dtype=bool)
            every = np.ones(n, dtype=bool)
            for condition in c.rows:
                a, b = at_ends(condition)
                some &= high_over_bh(a) | high_over_bh(b)
                every &= low_over_bh(a) & low_over_bh(b)
            touched = some & (touch_lo <= touch_hi)
            full = every & (full_lo <= full_hi)
            out.append((np.where(touched, touch_lo, self.kv_len), np.where(touched, touch_hi, -1),
                        np.where(full, full_lo, 1), np.where(full, full_hi, 0)))
        return out

    def _every_row(self):
        """The same from every row: for lookups and non-monotone bounds."""
        m, nb, nh, rows = self.low.shape
        tile = torch.arange(rows, device=self.low.device) // self.block_m
        low = self.low.clamp(min=0).amax((1, 2)) if nb * nh > 1 else self.low.clamp(min=0)[:, 0, 0]
        high = (self.high.clamp(max=self.kv_len - 1).amin((1, 2)) if nb * nh > 1
                else self.high.clamp(max=self.kv_len - 1)[:, 0, 0])
        low_any = self.low.clamp(min=0).amin((1, 2))
        high_any = self.high.clamp(max=self.kv_len - 1).amax((1, 2))
        out = []
        for j in range(m):
            nonempty = low_any[j] <= high_any[j]
            touch_lo = _reduce(torch.where(nonempty, low_any[j], self.kv_len), tile, "amin",
                               self.q_tiles, self.kv_len)
            touch_hi = _reduce(torch.where(nonempty, high_any[j], -1), tile, "amax",
                               self.q_tiles, -1)
            full_lo = _reduce(low[j], tile, "amax", self.q_tiles, -1)
            full_hi = _reduce(high[j], tile, "amin", self.q_tiles, self.kv_len)
            empty = full_lo > full_hi
            out.append((touch_lo, touch_hi, torch.where(empty, 1, full_lo),
                        torch.where(empty, 0, full_hi)))
        return out

    def kv_blocks(self, q_start: int, q_stop: int):
        """Key ranges for the CPU path: (start, stop, masked), the fully kept part unmasked.

        ``q_start`` must be a multiple of ``block_m`` and ``q_stop`` the end of that tile."""
        lo, hi, full_lo, full_hi = self._ranges_table[q_start // self.block_m]
        if lo > hi:
            return []
        if full_lo > full_hi:
            return [(lo, hi + 1, True)]
        parts = [(lo, full_lo, True), (full_lo, full_hi + 1, False), (full_hi + 1, hi + 1, True)]
        return [p for p in parts if p[0] < p[1]]

    @functools.cached_property
    def _ranges_table(self) -> list[tuple[int, int, int, int]]:
        return [tuple(r) for r in self.tile_ranges().tolist()]

    # -- the exact tile matrix ------------------------------------------------------------

    def tiles(self) -> torch.Tensor:
        """EMPTY / PARTIAL / FULL per (b', h', query tile, key tile), as int8."""
        m, nb, nh, rows = self.low.shape
        bn, n_tiles = self.block_n, self.kv_tiles
        low = self.low.clamp(min=0)
        high = self.high.clamp(max=self.kv_len - 1)
        nonempty = low <= high
        tile_of_row = torch.arange(rows, device=low.device) // self.block_m
        # Rows touching a tile, counted with a difference array over the key tiles.
        touch = torch.zeros(nb, nh, self.q_tiles, n_tiles + 1, dtype=torch.int64,
                            device=low.device)
        for j in range(m):
            first = torch.where(nonempty[j], low[j] // bn, n_tiles)
            last = torch.where(nonempty[j], high[j] // bn + 1, n_tiles)
            _scatter_count(touch, tile_of_row, first, last)
        touched = touch.cumsum(-1)[..., :n_tiles] > 0
        # Rows covering a tile entirely: merge the exact intervals of each row first.
        cover = torch.zeros_like(touch)
        exact = [j for j in range(m) if self.exact[j]]
        if exact:
            for start, stop in _merge(low[exact], high[exact]):
                # Tile t is covered when start <= t*bn and stop >= min((t+1)*bn, kv_len) - 1.
                first = (start + bn - 1) // bn
                last_end = torch.where(stop >= self.kv_len - 1,
                                       torch.full_like(stop, n_tiles), (stop + 1) // bn)
                valid = start <= stop
                first = torch.where(valid, first, n_tiles)
                last_end = torch.where(valid, torch.maximum(last_end, first), n_tiles)
                _scatter_count(cover, tile_of_row, first, last_end)
        covered = cover.cumsum(-1)[..., :n_tiles]
        rows_in_tile = torch.bincount(tile_of_row, minlength=self.q_tiles).view(1, 1, -1, 1)
        out = torch.full(touched.shape, EMPTY, dtype=torch.int8, device=low.device)
        out[touched] = PARTIAL
        out[covered == rows_in_tile] = FULL
        return out

    def ranges(self, q_tile: int, b: int = 0, h: int = 0) -> list[tuple[int, int, int]]:
        """(first key tile, stop key tile, PARTIAL or FULL) runs of one query tile's row."""
        row = self.tiles()[min(b, self.low.shape[1] - 1), min(h, self.low.shape[2] - 1),
                           q_tile].tolist()
        out, start = [], 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                if row[start] != EMPTY:
                    out.append((start, t, row[start]))
                start = t
        return out

    @property
    def tile_density(self) -> float:
        """The fraction of tiles a kernel visits (PARTIAL or FULL)."""
        tiles = self.tiles()
        return float((tiles != EMPTY).float().mean()) if tiles.numel() else 0.0

    def density(self) -> float | None:
        """The fraction of (q, kv) positions kept, or None if a residual condition decides."""
        if not all(self.exact):
            return None
        total = 0
        for start, stop in _merge(self.low.clamp(min=0), self.high.clamp(max=self.kv_len - 1)):
            total += (stop - start + 1).clamp(min=0).to(torch.float64).mean((0, 1)).sum()
        return float(total) / max(1, self.q_len * self.kv_len)

    def __str__(self) -> str:
        tiles = self.tiles()[0, 0]
        head = (f"tile plan: q_len={self.q_len} kv_len={self.kv_len} "
                f"tiles {self.block_m}x{self.block_n} ({self.q_tiles}x{self.kv_tiles}), "
                f"{SYMBOLS[FULL]} full {SYMBOLS[PARTIAL]} partial {SYMBOLS[EMPTY]} empty")
        lines = [head]
        for row in tiles.tolist():
            lines.append("".join(SYMBOLS[t] for t in row))
        density = self.density()
        lines.append(f"tiles visited: {100 * self.tile_density:.1f}%"
                     + ("" if density is None else f", positions kept: {100 * density:.1f}%"))
        return "\n".join(lines)


def _reduce(values: torch.Tensor, tile: torch.Tensor, how: str, tiles: int, fill: int):
    """Per-tile min or max of per-row values."""
    out = torch.full((tiles,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, tile, values, reduce=how, include_self=True)


def _merge_full(best_lo, best_hi, lo, hi, xp=torch):
    """Keep one range kept by every row: merge if touching, else keep the longer (as kernels
    do). ``xp`` is torch or NumPy, whose elementwise functions share these names."""
    valid = lo <= hi
    none = best_lo > best_hi
    touch = (lo <= best_hi + 1) & (hi >= best_lo - 1) & ~none
    longer = (hi - lo) > (best_hi - best_lo)
    take = valid & (none | (~touch & longer))
    merge = valid & touch
    return (xp.where(take, lo, xp.where(merge, xp.minimum(best_lo, lo), best_lo)),
            xp.where(take, hi, xp.where(merge, xp.maximum(best_hi, hi), best_hi)))


def _scatter_count(counts, tile_of_row, first, last):
    """counts[b, h, tile_of_row[r], first[r]] += 1 and [.., last[r]] -= 1 for every row."""
    nb, nh, n_q, width = counts.shape
    first, last = torch.broadcast_tensors(first, last)
    first = first.expand(nb, nh, -1).clamp(0, width - 1)
    last = last.expand(nb, nh, -1).clamp(0, width - 1)
    base = (tile_of_row * width).view(1, 1, -1)
    flat = counts.view(nb, nh, -1)
    flat.scatter_add_(-1, base + first, torch.ones_like(first))
    flat.scatter_add_(-1, base + last, -torch.ones_like(last))


def _merge(low: torch.Tensor, high: torch.Tensor):
    """Merge each row's intervals (along dim 0) into disjoint, non-adjacent ones.

    Yields (start, stop) tensors of the row shape; rows without an interval there get an empty
    one (start > stop).
    """
    big = torch.iinfo(torch.int64).max // 4
    empty = low > high
    low = torch.where(empty, big, low)
    high = torch.where(empty, big - 1, high)
    order = low.argsort(dim=0)
    low, high = low.gather(0, order), high.gather(0, order)
    start, stop = low[0], high[0]
    for j in range(1, low.shape[0]):
        apart = low[j] > stop + 1
        yield torch.where(apart, start, big), torch.where(apart, stop, big - 1)
        start = torch.where(apart, low[j], start)
        stop = torch.where(apart, high[j], torch.maximum(stop, high[j]))
    yield start, stop


def plan(spec: CheckedSpec, q_len: int, kv_len: int, *, block_m: int = 128,
         block_n: int = 128, params: Mapping[str, float] | None = None,
         tensors: Mapping[str, torch.Tensor] | None = None, batch: int = 1, heads: int = 1,
         analysis: MaskAnalysis | None = None) -> TilePlan:
    """The tile plan of ``spec`` for these lengths, tiles, parameters and tensors.

    >>> from flexdsl.check import check
    >>> print(plan(check("where q >= kv"), 64, 64, block_m=16, block_n=16))
    tile plan: q_len=64 kv_len=64 tiles 16x16 (4x4), # full + partial . empty
    +...
    #+..
    ##+.
    ###+
    tiles visited: 62.5%, positions kept: 50.8%
    """
    analysis = analysis or MaskAnalysis.of(spec)
    params = dict(params or {})
    tensors = dict(tensors or {})
    values = {"q_len": q_len, "kv_len": kv_len, "n_batch": batch, "n_heads": heads, **params}
    check_positive(analysis.by_query, values, spec)
    aux, documents_exact = document_tensors(analysis.by_query, tensors, q_len, kv_len)
    return TilePlan(analysis, q_len, kv_len, block_m, block_n, batch, heads, values,
                    {**tensors, **aux}, documents_exact)


def brute_force_tiles(spec: CheckedSpec, q_len: int, kv_len: int, block_m: int, block_n: int,
                      params=None, tensors=None, batch: int = 1, heads: int = 1) -> torch.Tensor:
    """The tile matrix by evaluating the mask at every position: the oracle for tests."""
    grid = eager.Grid(eager.positions(batch, heads, q_len, kv_len, "cpu"), dict(params or {}),
                      dict(tensors or {}), torch.float64, None, spec.text)
    if spec.spec.mask is None:
        keep = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    else:
        keep = eager.evaluate(spec.spec.mask, grid)
    keep = torch.broadcast_to(keep, (*keep.shape[:2], q_len, kv_len))
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    pad = torch.zeros(*keep.shape[:2], nq * block_m, nk * block_n, dtype=torch.int64)
    valid = torch.zeros_like(pad)
    pad[..., :q_len, :kv_len] = keep.long()
    valid[..., :q_len, :kv_len] = 1
    kept = pad.view(*pad.shape[:2], nq, block_m, nk, block_n).sum((3, 5))
    size = valid.view(*pad.shape[:2], nq, block_m, nk, block_n).sum((3, 5))
    out = torch.full(kept.shape, PARTIAL, dtype=torch.int8)
    out[kept == 0] = EMPTY
    out[kept == size] = FULL
    return out


__all__ = ["EMPTY", "FULL", "PARTIAL", "MaskAnalysis", "TilePlan", "brute_force_tiles",
           "plan"]
