"""``flexdsl show | lower | bench``: issue 6, item 3.

The picture is read back and checked pixel by pixel: the tile panel against the plan (and the
plan against brute force), the mask panel against the mask evaluated by hand from the document
ids. Exit codes: 0 done, 1 a bad spec or file, 2 a bad command line.
"""
import ast
import json
import os
import pathlib
import re
import subprocess

import numpy as np
import pytest
import torch

from flexdsl import cli, config, viz
from flexdsl.analysis.plan import EMPTY, FULL, PARTIAL, SYMBOLS, brute_force_tiles
from test_cli import flexdsl_command

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib depends on Pillow)

ROOT = pathlib.Path(__file__).parent.parent
PACKED = ROOT / "specs" / "packed_documents.toml"
ALIBI = ROOT / "specs" / "alibi.toml"
N = 1024


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def picture(path):
    """The PNG's pixels as (H, W, 3) floats, and its panel boxes."""
    pixels = matplotlib.image.imread(path)[..., :3]
    boxes = json.loads(Image.open(path).text[viz.METADATA_KEY])
    return pixels, {name: viz.Box(**box) for name, box in boxes.items()}


def colour_at(pixels, x: float, y: float):
    return pixels[int(y), int(x)]


def is_colour(pixel, colour: str) -> bool:
    return bool(np.abs(pixel - np.array(to_rgb(colour))).max() < 0.02)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """``flexdsl show specs/packed_documents.toml --q-len 1024 --png mask.png``, as a user
    would type it, in an empty directory."""
    where = tmp_path_factory.mktemp("show")
    # Where the package is not installed, the module runs from this checkout.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([*flexdsl_command(), "show", str(PACKED), "--q-len", str(N),
                           "--png", "mask.png"], capture_output=True, text=True, cwd=where,
                          timeout=300, env={**os.environ, "PYTHONPATH": path})
    doc = config.example_tensors(config.read_spec_file(PACKED), q_len=N, kv_len=N)["doc"]
    return done, where / "mask.png", doc


def test_show_prints_the_tile_map_of_the_plan(packed):
    done, _, doc = packed
    assert done.returncode == 0, done.stderr
    spec = config.read_spec_file(PACKED).checked
    want = brute_force_tiles(spec, N, N, 128, 128, tensors={"doc": doc})[0, 0]
    lines = done.stdout.splitlines()
    head = lines.index("tile plan: q_len=1024 kv_len=1024 tiles 128x128 (8x8), "
                       "# full + partial . empty")
    assert lines[head + 1:head + 9] == ["".join(SYMBOLS[t] for t in row) for row in want.tolist()]
    kept = float(((doc[:, None] == doc[None, :]) & torch.ones(N, N, dtype=torch.bool).tril())
                 .double().mean())
    visited = float((want != EMPTY).double().mean())
    assert lines[head + 9] == f"tiles visited: {100 * visited:.1f}%, positions kept: " \
                              f"{100 * kept:.1f}%"
    assert lines[0] == "packed documents: where doc[q] == doc[kv] and q >= kv"


def test_show_reports_progress_on_stderr(packed):
    done, _, _ = packed
    stages = [line for line in done.stderr.splitlines() if line.startswith("flexdsl show: ")]
    assert any("planning 128x128 tiles" in s for s in stages)
    assert stages[-1].startswith("flexdsl show: wrote mask.png (")


def test_the_tile_panel_shows_the_plan(packed):
    done, png, doc = packed
    pixels, boxes = picture(png)
    assert set(boxes) == {"mask", "tiles"}  # no score expression, no heat map
    box = boxes["tiles"]
    spec = config.read_spec_file(PACKED).checked
    tiles = brute_force_tiles(spec, N, N, 128, 128, tensors={"doc": doc})[0, 0]
    assert {EMPTY, PARTIAL, FULL} <= set(tiles.flatten().tolist())
    n_q, n_kv = tiles.shape
    for i in range(n_q):
        for j in range(n_kv):
            x = box.left + (j + 0.5) * box.width / n_kv
            y = box.top + (i + 0.5) * box.height / n_q
            state = int(tiles[i, j])
            assert is_colour(colour_at(pixels, x, y), viz.TILE_COLOURS[state]), (i, j, state)


def test_the_mask_panel_shows_the_document_blocks(packed):
    _, png, doc = packed
    pixels, boxes = picture(png)
    box = boxes["mask"]
    q = torch.arange(N)
    keep = (doc[:, None] == doc[None, :]) & (q[:, None] >= q[None, :])

    def pixel(row: float, col: float):
        """The pixel showing query position ``row`` and key position ``col``."""
        return colour_at(pixels, box.left + (col + 0.5) * box.width / N,
                         box.top + (row + 0.5) * box.height / N)

    # Each document's block: kept below its diagonal, masked against every other document.
    starts = [0] + (torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1).tolist() + [N]
    blocks = [(a, b) for a, b in zip(starts, starts[1:]) if b - a >= 16]
    assert len(blocks) >= 3
    for a, b in blocks:
        assert is_colour(pixel(a + 3 * (b - a) // 4, a + (b - a) // 4), viz.KEPT), (a, b)
        assert is_colour(pixel(a + (b - a) // 4, a + 3 * (b - a) // 4), viz.MASKED), (a, b)
    for (a, b), (c, d) in zip(blocks, blocks[1:]):
        assert is_colour(pixel((c + d) // 2, (a + b) // 2), viz.MASKED), (a, b, c, d)

    # Every pixel whose neighbourhood (two positions around it) is all kept or all masked,
    # inside the panel's frame.
    checked = 0
    for y in range(box.top + 2, box.top + box.height - 2, 3):
        for x in range(box.left + 2, box.left + box.width - 2, 3):
            row = int((y + 0.5 - box.top) * N / box.height)
            col = int((x + 0.5 - box.left) * N / box.width)
            near = keep[max(0, row - 2):row + 3, max(0, col - 2):col + 3]
            if near.all() or not near.any():
                colour = viz.KEPT if near.all() else viz.MASKED
                assert is_colour(pixels[y, x], colour), (row, col)
                checked += 1
    assert checked > 0.85 * (box.width // 3) * (box.height // 3)


def test_a_score_expression_gets_a_heat_map(tmp_path, capsys):
    png = tmp_path / "alibi.png"
    code, out, _ = run(capsys, "show", str(ALIBI), "--q-len", "256", "--tile", "64",
                       "--png", str(png), "--quiet")
    assert code == 0
    pixels, boxes = picture(png)
    assert set(boxes) == {"mask", "tiles", "modification"}
    box = boxes["modification"]

    def pixel(row, col):
        return colour_at(pixels, box.left + (col + 0.5) * box.width / 256,
                         box.top + (row + 0.5) * box.height / 256)

    # slope[0] * (kv - q): 0 on the diagonal (white), ever more negative (blue) below it;
    # masked above it.
    white = pixel(200, 200)
    assert white.min() > 0.9
    far = pixel(250, 5)
    assert far[2] > far[0] + 0.3
    assert is_colour(pixel(5, 250), viz.MASKED)
    assert sum(pixel(250, c)[2] - pixel(250, c)[0] for c in (10, 100)) > 0


def test_a_string_spec_needing_a_tensor_says_how_to_pass_one(capsys):
    code, out, err = run(capsys, "show", "where doc[q] == doc[kv] and q >= kv", "--q-len", "256")
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if not line.startswith("flexdsl show: ")]
    assert lines[0] == ("error: the spec needs the tensor 'doc', and a spec string cannot say "
                        "how to make it")
    assert lines[1:3] == ["  where doc[q] == doc[kv] and q >= kv", "        ^^^^^^"]
    assert lines[3].startswith("hint: pass --tensor doc=documents,count=4, or use a spec file "
                               "with [tensors.doc]")


def test_a_tensor_from_the_command_line(capsys):
    code, out, _ = run(capsys, "show", "where doc[q] == doc[kv] and q >= kv", "--q-len", "200",
                       "--tile", "32", "--tensor", "doc=documents,count=3", "--seed", "7",
                       "--quiet")
    assert code == 0
    recipe = config.read({"spec": "where doc[q] == doc[kv] and q >= kv",
                          "tensors": {"doc": {"kind": "documents", "count": 3}}})
    doc = config.example_tensors(recipe, q_len=200, kv_len=200, seed=7)["doc"]
    want = brute_force_tiles(recipe.checked, 200, 200, 32, 32, tensors={"doc": doc})[0, 0]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("tile plan:"))
    assert lines[head + 1:head + 8] == ["".join(SYMBOLS[t] for t in row)
                                        for row in want.tolist()]


@pytest.mark.parametrize("argv, message", [
    (["show", str(ROOT / "specs" / "causal.toml"), "--q-len", "64", "--tensor", "doc=documents"],
     "error: --tensor doc: 'doc' is not a tensor of the spec"),
    (["show", "where doc[q] == doc[kv]", "--q-len", "64", "--tensor", "doc=documnts"],
     "error: --tensor doc.kind: unknown tensor kind 'documnts'"),
    (["show", "where q < W", "--q-len", "64"], "error: the spec needs a value for 'W'"),
    (["show", "where doc[q] == doc[kv]", "--q-len", "64", "-p", "doc=3"],
     "error: 'doc' is a tensor of the spec, not a parameter"),
    (["show", str(ROOT / "specs" / "neighbourhood_2d.toml"), "--q-len", "64", "--kv-len", "32"],
     "q and kv index one sequence here, so --kv-len must equal --q-len (64)"),
    (["show", "nothing.toml", "--q-len", "64"], "error: no such spec file: nothing.toml"),
    (["show", "where q >= kv", "--q-len", "64", "--png", "no/such/dir/x.png"],
     "error: cannot write no/such/dir/x.png: "),
    (["lower", "where q >= x"], "error: unknown name 'x'"),
])
def test_bad_specs_and_files_exit_1(capsys, argv, message):
    code, _, err = run(capsys, *argv, *(["--quiet"] if argv[0] == "show" else []))
    assert code == 1
    assert message in [line for line in err.splitlines() if line.startswith("error: ")][0]


@pytest.mark.parametrize("argv, message", [
    (["show", "where q >= kv"], "the following arguments are required: --q-len"),
    (["show", "where q >= kv", "--q-len", "0"], "expected a positive integer, got 0"),
    (["show", "where q >= kv", "--q-len", "64", "--tile", "16", "--block-m", "32"],
     "--tile sets both tile sizes"),
    (["show", "where doc[q] == doc[kv]", "--q-len", "64", "--tensor", "doc"],
     "expected NAME=KIND[,OPTION=VALUE...]"),
    (["lower", "where q >= kv", "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["bench", "where q >= kv", "--q-len", "64", "--heads", "3", "--kv-heads", "2"],
     "--heads (3) must be a multiple of --kv-heads (2)"),
])
def test_bad_usage_exits_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, options", [
    ("doc=documents", {"kind": "documents"}),
    ("doc=documents,count=4,first=-1", {"kind": "documents", "count": 4, "first": -1}),
    ("g=bernoulli,shape=[\"max(q_len, kv_len)\"],p=0.25",
     {"kind": "bernoulli", "shape": ["max(q_len, kv_len)"], "p": 0.25}),
    ("d=documents,count=2,length=max(q_len, kv_len)",
     {"kind": "documents", "count": 2, "length": "max(q_len, kv_len)"}),
])
def test_tensor_recipes_read_like_a_tensors_table(text, options):
    assert cli._tensor_recipe(text) == (text.split("=")[0], options)


def test_lower_prints_the_kernel_source(capsys):
    code, out, _ = run(capsys, "lower", "cap * tanh(score / cap) where q >= kv")
    assert code == 0
    assert "def attention_forward(" in out
    assert "# flexdsl kernel for: cap * tanh(score / cap) where q >= kv" in out
    ast.parse(out)  # plain Python a user can read and save
    assert "tanh.approx.f32" in out  # 16-bit inputs (the default, bf16) use the fast tanh
    code, out, _ = run(capsys, "lower", "cap * tanh(score / cap) where q >= kv", "--dtype",
                       "fp32")
    assert code == 0 and "def attention_forward(" in out and "tanh.approx.f32" not in out


def test_lower_reads_spec_files(capsys):
    code, out, _ = run(capsys, "lower", str(ROOT / "specs" / "alibi_documents.toml"))
    assert code == 0
    assert ("# flexdsl kernel for: score + slope[h] * (kv - q) where doc[q] == doc[kv] and "
            "q >= kv") in out


def test_bench_times_one_spec(capsys):
    code, out, err = run(capsys, "bench", str(ROOT / "specs" / "sliding_window.toml"),
                         "--q-len", "96", "--heads", "2", "--dim", "16", "--forward-only")
    assert code == 0
    device = ("Triton kernels" if torch.cuda.is_available() else
              "no CUDA GPU, so this times the CPU path (chunked PyTorch), fp32")
    assert any(line.startswith("device: ") and device in line for line in out.splitlines())
    assert "shape: batch 1, heads 2 (kv heads 2), q_len 96, kv_len 96, dim 16" in out
    assert re.search(r"^forward: +\d+\.\d{3} ms +\d+\.\d [GT]FLOP/s$", out, re.M)
    assert "forward+backward" not in out
    assert "flexdsl bench: timing the forward pass" in err
