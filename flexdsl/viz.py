"""Pictures of a spec (``flexdsl show --png``): the mask position by position beside the tile
plan, and, for a spec with a score expression, a heat map of what it adds to the score.

Rendering only: the caller evaluates the mask and plans the tiles, this module turns those
arrays into a PNG. matplotlib (the ``viz`` extra) is imported when a picture is drawn, and
drawn without pyplot, so no GUI backend or global figure state is involved.

Every panel is an image of known pixel size at a known place, so the picture can be read back:
the PNG carries each panel's box as JSON in its ``flexdsl:panels`` text chunk.

>>> pixel_positions(4, 8).tolist()
[0, 1, 2, 3]
>>> pixel_positions(10, 4).tolist()
[1, 3, 6, 8]
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .analysis.plan import EMPTY, FULL, PARTIAL

TILE_COLOURS = {EMPTY: "#ececec", PARTIAL: "#f2a541", FULL: "#1f5fa8"}
TILE_NAMES = {EMPTY: "empty (skipped)", PARTIAL: "partial (masked)", FULL: "full (no mask)"}
KEPT, MASKED = "#243b6b", "#f7f7f7"

PANEL = 512     # pixels along a panel's longer side
DPI = 100
_LEFT, _GAP, _RIGHT, _TOP, _BOTTOM = 80, 100, 40, 80, 110
_BAR, _BAR_GAP, _BAR_LABELS = 16, 12, 70
METADATA_KEY = "flexdsl:panels"


@dataclass(frozen=True)
class Box:
    """Where a panel's image lies in the PNG, in pixels from its top-left corner."""
    left: int
    top: int
    width: int
    height: int


def panel_size(q_len: int, kv_len: int) -> tuple[int, int]:
    """(height, width) in pixels of a panel for these lengths: queries down, keys across."""
    ratio = q_len / kv_len
    if ratio >= 1:
        return PANEL, max(PANEL // 4, round(PANEL / ratio))
    return max(PANEL // 4, round(PANEL * ratio)), PANEL


def pixel_positions(length: int, pixels: int) -> np.ndarray:
    """The position each pixel row (or column) of a panel shows: every position when they fit,
    else the one under each pixel's centre, as nearest-neighbour drawing would pick."""
    if length <= pixels:
        return np.arange(length)
    return ((np.arange(pixels) + 0.5) * length / pixels).astype(np.int64)


def layout(q_len: int, kv_len: int, heat_map: bool) -> tuple[tuple[int, int], dict[str, Box]]:
    """The figure's (width, height) in pixels and the box of each panel."""
    height, width = panel_size(q_len, kv_len)
    names = ["mask", "tiles"] + (["modification"] if heat_map else [])
    boxes = {name: Box(_LEFT + i * (width + _GAP), _TOP, width, height)
             for i, name in enumerate(names)}
    figure_width = _LEFT + len(names) * width + (len(names) - 1) * _GAP + _RIGHT
    if heat_map:
        figure_width += _BAR_GAP + _BAR + _BAR_LABELS
    return (figure_width, _TOP + height + _BOTTOM), boxes


def draw(path, *, mask, tiles, q_len: int, kv_len: int, block_m: int, block_n: int,
         kept: float | None, visited: float, modification=None, score: float = 0.0,
         title: str = "") -> dict[str, Box]:
    """Write the picture to ``path`` (PNG) and return the box of each panel.

    ``mask`` is the kept (True) / masked (False) grid at the positions :func:`pixel_positions`
    picks, ``tiles`` the EMPTY / PARTIAL / FULL matrix of the plan, ``modification`` (or None)
    the score expression minus the score at ``score``, NaN where masked. ``kept`` and
    ``visited`` are the fractions of positions kept and tiles visited, for the titles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    mask, tiles = np.asarray(mask, dtype=bool), np.asarray(tiles)
    heat_map = modification is not None
    (width, height), boxes = layout(q_len, kv_len, heat_map)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(figure)

    def axes(box: Box):
        ax = figure.add_axes([box.left / width, (height - box.top - box.height) / height,
                              box.width / width, box.height / height])
        ax.set_xlabel("key position kv")
        ax.set_ylabel("query position q")
        ax.tick_params(labelsize=8)
        return ax

    def legend(ax, colours: dict[str, str]):
        ax.legend(handles=[Patch(facecolor=c, edgecolor="#888888", label=n)
                           for n, c in colours.items()],
                  loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(colours),
                  frameon=False, fontsize=8, handlelength=1.2, columnspacing=1.0)

    ax = axes(boxes["mask"])
    ax.imshow(mask.astype(np.int8), cmap=ListedColormap([MASKED, KEPT]), vmin=0, vmax=1,
              interpolation="nearest", aspect="auto", extent=(0, kv_len, q_len, 0))
    sampled = mask.shape != (q_len, kv_len)
    ax.set_title("mask at b = h = 0" + (" (sampled)" if sampled else "")
                 + ("" if kept is None else f": {100 * kept:.1f}% kept"), fontsize=10)
    legend(ax, {"kept": KEPT, "masked": MASKED})

    ax = axes(boxes["tiles"])
    n_q, n_kv = tiles.shape
    ax.imshow(tiles, cmap=ListedColormap([TILE_COLOURS[s] for s in (EMPTY, PARTIAL, FULL)]),
              vmin=EMPTY, vmax=FULL, interpolation="nearest", aspect="auto",
              extent=(0, n_kv * block_n, n_q * block_m, 0))
    # The same axes as the mask: a last tile that runs past the length is cut there.
    ax.set_xlim(0, kv_len)
    ax.set_ylim(q_len, 0)
    box = boxes["tiles"]
    if box.width >= 6 * n_kv and box.height >= 6 * n_q:  # lines between tiles while they fit
        ax.hlines(np.arange(1, n_q) * block_m, 0, kv_len, colors="white", linewidth=1)
        ax.vlines(np.arange(1, n_kv) * block_n, 0, q_len, colors="white", linewidth=1)
    ax.set_title(f"tiles {block_m}x{block_n}: {100 * visited:.1f}% visited", fontsize=10)
    legend(ax, {TILE_NAMES[s]: TILE_COLOURS[s] for s in (FULL, PARTIAL, EMPTY)})

    if heat_map:
        import matplotlib
        values = np.asarray(modification, dtype=np.float64)
        finite = values[np.isfinite(values)]
        limit = float(np.abs(finite).max()) if finite.size else 0.0
        colours = matplotlib.colormaps["RdBu_r"].with_extremes(bad=MASKED)
        ax = axes(boxes["modification"])
        image = ax.imshow(np.ma.masked_invalid(values), cmap=colours,
                          vmin=-(limit or 1.0), vmax=limit or 1.0, interpolation="nearest",
                          aspect="auto", extent=(0, kv_len, q_len, 0))
        ax.set_title(f"score expression - score, at score = {score:g}", fontsize=10)
        box = boxes["modification"]
        bar = figure.add_axes([(box.left + box.width + _BAR_GAP) / width,
                               (height - box.top - box.height) / height,
                               _BAR / width, box.height / height])
        figure.colorbar(image, cax=bar).ax.tick_params(labelsize=8)

    if title:
        figure.suptitle(title, fontsize=11, y=1 - 18 / height, va="top")
    panels = json.dumps({name: asdict(box) for name, box in boxes.items()})
    figure.savefig(path, format="png", dpi=DPI, facecolor="white",
                   metadata={METADATA_KEY: panels})
    return boxes


__all__ = ["Box", "DPI", "KEPT", "MASKED", "METADATA_KEY", "PANEL", "TILE_COLOURS", "draw",
           "layout", "panel_size", "pixel_positions"]
