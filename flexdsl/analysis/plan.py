"""Tile plans: which (query tile, key tile) pairs are EMPTY, FULL or PARTIAL.

Built from the per-row bounds of ``bounds.solve``: evaluating them costs O(rows), never
O(Sq x Skv). Two views come from the same rows:

- ``kv_ranges`` / ``q_ranges``: per tile, the hull of the keys it touches and one range that is
  fully kept, the very formulas the kernels compute for themselves (cheap, sound);
- ``tiles()``: the exact tile matrix, by counting per tile how many rows touch or cover it
  (exact whenever the mask is fully captured by bounds; sound otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .. import eager, ir
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
            key = (d.lower.tensor, table.data_ptr(), table._version, tuple(table.shape),
                   str(table.device), row_len, col_len)
            cached = _runs.get(key)
            if cached is not None:
                low, high, ordered = cached
                out[d.lower.tensor], out[d.upper.tensor] = low, high
                exact = exact and ordered
                continue
            cols = table[..., :col_len].contiguous()
            rows = table[..., :row_len].contiguous()
            ordered = bool((cols[..., 1:] >= cols[..., :-1]).all()) if col_len > 1 else True
            if ordered:
                low = torch.searchsorted(cols, rows, right=False)
                high = torch.searchsorted(cols, rows, right=True) - 1
            else:
                exact = False
                low = torch.zeros_like(rows, dtype=torch.int64)
                high = torch.full_like(rows, col_len - 1, dtype=torch.int64)
            out[d.lower.tensor] = low.to(torch.int32 if table.is_cuda else torch.int64)
            out[d.upper.tensor] = high.to(out[d.lower.tensor].dtype)
            if len(_runs) > 64:
                _runs.clear()
            _runs[key] = (out[d.lower.tensor], out[d.upper.tensor], ordered)
    return out, exact


_runs: dict[tuple, tuple] = {}


def check_positive(solved: Solved, values: Mapping[str, float], spec: CheckedSpec) -> None:
    for name in solved.positive:
        if values[name] <= 0:
            raise SpecCallError(
                f"parameter '{name}' must be positive: positions are divided by it",
                spec=spec.text, span=spec.signature.params[name].span,
                hint=f"pass {name} >= 1")


def row_intervals(solved: Solved, spec: CheckedSpec, *, rows: int, cols: int, batch: int,
                  heads: int, values: Mapping[str, float],
                  tensors: Mapping[str, torch.Tensor], documents_exact: bool = True,
                  row_start: int = 0, row_stop: int | None = None):
    """Per conjunction and row, the interval [low, high] of columns its bounds allow.

    Returns ``low``, ``high`` of shape (m, B', H', R) (B', H' are 1 unless bounds depend on b
    or h; an empty interval has low > high) and, per conjunction, whether it is exact.
    """
    row_stop = rows if row_stop is None else row_stop
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    q_len, kv_len = (rows, cols) if solved.row == "q" else (cols, rows)
    grid_positions = eager.positions(batch, heads, q_len, kv_len, device)
    grid_positions[solved.row] = torch.arange(row_start, row_stop, device=device).view(1, 1, -1,
                                                                                          1)
    params = {k: v for k, v in values.items() if k in spec.signature.params}
    grid = eager.Grid(grid_positions, params, tensors, torch.float64, None, spec.text)
    n_rows = row_stop - row_start
    shape = (1, 1, n_rows)
    lows, highs, exact = [], [], []
    for c in solved.conjunctions:
        low = torch.zeros(shape, dtype=torch.int64, device=device)
        high = torch.full(shape, cols - 1, dtype=torch.int64, device=device)
        for bound in c.lower + tuple(d.lower for d in c.documents):
            low = torch.maximum(low, _rows(eager.evaluate(bound, grid)))
        for bound in c.upper + tuple(d.upper for d in c.documents):
            high = torch.minimum(high, _rows(eager.evaluate(bound, grid)))
        for condition in c.rows:
            keep = _rows(eager.evaluate(condition, grid))
            high = torch.where(keep, high, torch.tensor(-1, device=device))
            low = torch.where(keep, low, torch.tensor(cols, device=device))
        low, high = torch.broadcast_tensors(low, high)
        lows.append(low)
        highs.append(high)
        exact.append(c.exact and (documents_exact or not c.documents))
    if not lows:  # the mask is never true
        lows = [torch.full(shape, cols, dtype=torch.int64, device=device)]
        highs = [torch.full(shape, -1, dtype=torch.int64, device=device)]
        exact = [True]
    low, high = _stack(lows), _stack(highs)
    return low, high, tuple(exact)


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
    """The tile plan of one spec for given lengths, tile sizes, parameters and tensors."""
    analysis: MaskAnalysis
    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    low: torch.Tensor      # (m, B', H', Sq): per conjunction, first key each query may keep
    high: torch.Tensor     # last key it may keep
    exact: tuple[bool, ...]

    @property
    def q_tiles(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def kv_tiles(self) -> int:
        return -(-self.kv_len // self.block_n)

    # -- the kernel's view: per query tile, a hull and one fully kept range -----------------

    def kv_ranges(self, q_start: int = 0, q_stop: int | None = None):
        """(lo, hi, full_lo, full_hi) over the rows [q_start, q_stop), reduced over b and h.

        Keys [lo, hi] hold every kept position of these rows; keys [full_lo, full_hi] are kept
        for all of them (empty when full_lo > full_hi).
        """
        q_stop = self.q_len if q_stop is None else q_stop
        low, high = self.low[..., q_start:q_stop], self.high[..., q_start:q_stop]
        return _hull_and_full(low, high, self.exact, self.kv_len)

    def kv_blocks(self, q_start: int, q_stop: int):
        """Key ranges for the CPU path: (start, stop, masked) with the fully kept part unmasked."""
        lo, hi, full_lo, full_hi = self.kv_ranges(q_start, q_stop)
        if lo > hi:
            return []
        if full_lo > full_hi:
            return [(lo, hi + 1, True)]
        parts = [(lo, full_lo, True), (full_lo, full_hi + 1, False), (full_hi + 1, hi + 1, True)]
        return [p for p in parts if p[0] < p[1]]

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


def _hull_and_full(low, high, exact, cols):
    """The kernels' reduction: a hull of all kept keys and one range kept by every row."""
    low = low.clamp(min=0)
    high = high.clamp(max=cols - 1)
    nonempty = low <= high
    big = cols
    hull_lo = torch.where(nonempty, low, big).amin().item() if low.numel() else big
    hull_hi = torch.where(nonempty, high, -1).amax().item() if low.numel() else -1
    full_lo, full_hi = 1, 0
    for j in range(low.shape[0]):
        if not exact[j] or low[j].numel() == 0:
            continue
        lo, hi = low[j].amax().item(), high[j].amin().item()
        if lo > hi:
            continue
        if full_lo > full_hi:
            full_lo, full_hi = lo, hi
        elif lo <= full_hi + 1 and hi >= full_lo - 1:   # overlapping or adjacent: merge
            full_lo, full_hi = min(full_lo, lo), max(full_hi, hi)
        elif hi - lo > full_hi - full_lo:
            full_lo, full_hi = lo, hi
    return hull_lo, hull_hi, full_lo, full_hi


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
    low, high, exact = row_intervals(analysis.by_query, spec, rows=q_len, cols=kv_len,
                                     batch=batch, heads=heads, values=values,
                                     tensors={**tensors, **aux},
                                     documents_exact=documents_exact)
    return TilePlan(analysis, q_len, kv_len, block_m, block_n, low, high, exact)


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
           "plan", "math", "ir"]
