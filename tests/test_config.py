"""Specs from config files and dicts: flexdsl.config.load/read, lets, example tensors and the
file:line:column of every error."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

import flexdsl
from flexdsl import cli
from flexdsl.config import (TENSOR_KINDS, example_tensors, load, looks_like_path, read,
                            read_spec_file, substitute)
from flexdsl.errors import SpecCallError, SpecError, SpecSyntaxError, SpecTypeError
from flexdsl.grammar import parse, parse_expression

yaml = pytest.importorskip("yaml")

# One attention table, written in each format, inside a larger model config.
TABLE = {
    "name": "documents with a window",
    "spec": "let near = q - kv < W\nwhere causal and near and doc[q] == doc[kv]",
    "let": {"causal": "q >= kv"},
    "params": {"W": 48},
    "tensors": {"doc": {"kind": "documents", "count": 3}},
}
EXPANDED = "where q >= kv and q - kv < W and doc[q] == doc[kv]"

TOML = '''\
# a model's config
[model]
dim = 512

[model.attention]
name = "documents with a window"
spec = """
let near = q - kv < W
where causal and near and doc[q] == doc[kv]
"""

[model.attention.let]
causal = "q >= kv"

[model.attention.params]
W = 48

[model.attention.tensors.doc]
kind = "documents"
count = 3
'''

YAML = '''\
model:
  dim: 512
  attention:
    name: documents with a window
    spec: |
      let near = q - kv < W
      where causal and near and doc[q] == doc[kv]
    let:
      causal: q >= kv
    params: {W: 48}
    tensors:
      doc: {kind: documents, count: 3}
'''


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(params=["toml", "yaml", "json"])
def config_path(request, tmp_path):
    text = {"toml": TOML, "yaml": YAML,
            "json": json.dumps({"model": {"dim": 512, "attention": TABLE}}, indent=2)}
    return write(tmp_path, f"model.{request.param}", text[request.param])


# -- loading -----------------------------------------------------------------------------------

def test_every_format_reads_the_same_table(config_path):
    spec_file = read(config_path, key="model.attention")
    assert spec_file.spec == EXPANDED
    assert spec_file.params == {"W": 48}
    assert spec_file.lets == {"causal": "q >= kv", "near": "q - kv < W"}
    assert spec_file.name == "documents with a window"
    assert spec_file.origin == str(config_path)
    assert spec_file.tensors["doc"].kind == "documents"


def test_load_compiles_with_the_table_defaults(config_path):
    attn = load(config_path, key="model.attention")
    assert isinstance(attn, flexdsl.Attention)
    assert str(attn.spec) == EXPANDED and attn.defaults == {"W": 48}
    assert load(config_path, key="model.attention", W=8).defaults == {"W": 8}
    # The loaded attention computes what the spec written out in full computes.
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    doc = torch.tensor([0] * 15 + [1] * 25)
    expected = flexdsl.compile(EXPANDED, W=48).reference(q, k, v, doc=doc)[0]
    torch.testing.assert_close(attn(q, k, v, doc=doc), expected, atol=1e-12, rtol=0)


def test_load_a_dict_with_or_without_a_key():
    assert read(TABLE).spec == EXPANDED
    assert read({"model": {"attention": TABLE}}, key="model.attention").spec == EXPANDED
    assert read({"layers": [{"attention": TABLE}]}, key="layers.0.attention").spec == EXPANDED


def test_load_a_string_and_a_bare_spec_entry():
    assert read("let causal = q >= kv\nwhere causal").spec == "where q >= kv"
    assert read({"model": {"attention": "where q >= kv"}}, key="model.attention").spec == \
        "where q >= kv"
    # Without lets the text is kept as written.
    assert read({"spec": "where q>=kv"}).spec == "where q>=kv"


def test_spec_file_with_key_on_the_command_line(config_path, capsys):
    target = f"{config_path}#model.attention"
    assert looks_like_path(target) and not looks_like_path("where q >= kv")
    assert read_spec_file(target).spec == EXPANDED
    assert cli.main(["check", target]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"spec: {EXPANDED}\n") and "bound: W=48" in out


def test_a_missing_key_names_what_is_there(config_path):
    with pytest.raises(SpecError, match="no entry 'atention' in model") as info:
        read(config_path, key="model.atention")
    assert info.value.hint == "did you mean 'attention'?"


def test_missing_file():
    with pytest.raises(SpecError, match="no such spec file: nowhere.toml"):
        read("nowhere.toml")


# -- lets ----------------------------------------------------------------------------------------

def test_substitution_is_on_the_tree_not_the_text():
    spec_file = read({"spec": "let near = q - kv\nwhere near * 2 < W and -near <= 3",
                      "params": {"W": 5}})
    assert spec_file.spec == "where (q - kv) * 2 < W and -(q - kv) <= 3"
    assert flexdsl.parse(spec_file.spec) == parse("where (q - kv) * 2 < W and -(q - kv) <= 3")


def test_substitute_replaces_names_and_keeps_spans():
    near = parse_expression("q - kv")
    node = substitute(parse_expression("abs(near) + near * 2"), {"near": near})
    assert node == parse_expression("abs(q - kv) + (q - kv) * 2")
    assert node.args[0].args[0].span == near.span if hasattr(node, "args") else True
    left = node.left.args[0]
    assert left is near  # the let's own node, spans included


def test_later_lets_use_earlier_ones():
    spec_file = read({"let": {"causal": "q >= kv", "local": "causal and q - kv < 4"},
                      "spec": "let keep = local or kv == 0\nwhere keep"})
    assert spec_file.spec == "where q >= kv and q - kv < 4 or kv == 0"


def test_a_let_compiles_like_its_expansion():
    spec_file = read({"spec": "let bump = slope[h] * (kv - q)\nscore + bump where q >= kv"})
    attn = flexdsl.compile(spec_file.spec)
    expected = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv")
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    slope = torch.tensor([0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(attn(q, k, v, slope=slope), expected(q, k, v, slope=slope))


@pytest.mark.parametrize("table, error, message", [
    ({"spec": "let q = kv\nwhere q"}, SpecTypeError, "cannot define 'q'"),
    ({"spec": "let exp = kv\nwhere exp > 1"}, SpecTypeError, "'exp' is a function"),
    ({"spec": "let w = kv\nwhere w > 1"}, SpecTypeError, "single lowercase letters"),
    ({"spec": "let near = kv\nlet near = q\nwhere near > 1"}, SpecTypeError,
     "defined twice"),
    ({"spec": "let W = kv\nwhere W > 1", "params": {"W": 1}}, SpecTypeError,
     "also a parameter"),
    ({"spec": "let first = second\nlet second = q\nwhere first > 1"}, SpecTypeError,
     "'second' is used before it is defined"),
    ({"spec": "let near = q\nwhere near[kv] > 1"}, SpecTypeError,
     "'near' is a let and cannot be indexed"),
    ({"spec": "where q > 1\nlet near = q"}, SpecSyntaxError, "let lines come before"),
    ({"spec": "let near q\nwhere q > 1"}, SpecSyntaxError, "a let line reads"),
    ({"spec": "let near = q"}, SpecSyntaxError, "the spec is missing after the let lines"),
    ({"spec": "where near", "let": {"near": 3}}, SpecError, "must be a string"),
    ({"spec": "where near", "let": {"near": "q +"}}, SpecSyntaxError, "ends too soon"),
])
def test_bad_lets(table, error, message):
    with pytest.raises(error, match=message):
        read(table)


# -- error locations -----------------------------------------------------------------------------

def caret_column(error: SpecError) -> int:
    """The column (0-based, in the file's line) that the rendered error's caret points at."""
    lines = str(error).splitlines()
    caret = next(line for line in lines if line.strip() and set(line.strip()) == {"^"})
    return caret.index("^") - 2  # excerpts are indented by two spaces


def assert_points_at(error: SpecError, path, text: str, token: str, line: int | None = None):
    """The error names path:line:column of ``token`` (on ``line``, else on the first line that
    holds it), and the excerpt is that line of the file with the caret under the token."""
    lines = text.splitlines()
    line = line or next(i for i, l in enumerate(lines, 1) if token in l)
    column = lines[line - 1].index(token)
    assert error.origin == f"{path}:{line}:{column + 1}"
    assert error.spec == lines[line - 1]
    assert caret_column(error) == column
    assert str(error).startswith(f"{path}:{line}:{column + 1}: ")


LOCATED = {  # file name, its text, the error, its message, the token the caret is under
    "toml, one-line spec": (
        "model.toml", '[model.attention]\nspec = "score + slope[x] where q >= kv"\n',
        SpecTypeError, "unknown name 'x'", "x]"),
    "toml, multi-line spec": (
        "model.toml", TOML.replace("doc[q] == doc[kv]", "doc[q] == doc[kv] and q // 1.5 > 2"),
        SpecTypeError, "a float is used with '//'", "1.5"),
    "toml, [let] table entry": (
        "model.toml", TOML.replace('causal = "q >= kv"', 'causal = "q >= kv and (kv + 1)"'),
        SpecTypeError, "'and' needs conditions", "kv + 1"),
    # A type error found only once the let is substituted still points where it is written.
    "toml, let line used by the spec": (
        "model.toml", TOML.replace("let near = q - kv < W", "let near = q - kv + W"),
        SpecTypeError, "'and' needs conditions", "q - kv + W"),
    "yaml, block scalar": (
        "model.yaml", YAML.replace("near and doc[q] == doc[kv]",
                                   "near and dok[q, kv] == 1 and doc[q] == dok[q]"),
        SpecTypeError, "'dok' is indexed with 1 index here", "dok[q]"),
    "json, escaped newlines": (
        "model.json", json.dumps({"model": {"attention": dict(
            TABLE, spec="let near = q - kv < W\nwhere causal and nearr")}}, indent=1),
        SpecTypeError, "'and' needs conditions", "nearr"),
    "yaml, let syntax": (
        "model.yaml", YAML.replace("causal: q >= kv", "causal: q >= kv +"),
        SpecSyntaxError, "ends too soon", "\n"),
}


@pytest.mark.parametrize("case", LOCATED)
def test_errors_point_at_the_file_line_and_column(tmp_path, case):
    name, text, error, message, token = LOCATED[case]
    path = write(tmp_path, name, text)
    with pytest.raises(error, match=message) as info:
        read(path, key="model.attention")
    if token == "\n":  # the caret stands just past the end of the line
        line = next(i for i, l in enumerate(text.splitlines(), 1) if l.endswith("kv +"))
        column = len(text.splitlines()[line - 1])
        assert info.value.origin == f"{path}:{line}:{column + 1}"
        assert caret_column(info.value) == column
    else:
        assert_points_at(info.value, path, text, token)
    if case == "toml, one-line spec":  # columns count from 1, as editors do
        assert info.value.origin == f"{path}:2:23"


BIAS = 'spec = "score + bias[h, q - kv + kv_len]"\n\n[tensors.bias]\n'
ENTRY_ERRORS = [  # a spec file, the error, its message, the token under the caret, its line
    ('spec = "where q - kv < W"\n\n[params]\nW = 2.5\n', SpecCallError,
     "parameter 'W' is an int, got 2.5", "2.5", None),
    ('spec = "where q - kv < W"\nparam = 3\n', SpecError,
     "unknown entry 'param'", "3", 2),
    ('spec = "where q - kv < W"\nparams = { W = 3, V = 2 }\n', SpecError,
     "unknown parameter 'V'", "2 }", None),
    (BIAS + 'kind = "gaussian"\nshape = ["heads", 3]\n', SpecError,
     "unknown tensor kind 'gaussian'", '"gaussian"', None),
    (BIAS + 'kind = "normal"\nshape = ["heads", "q_len + kvlen"]\n', SpecError,
     "unknown size 'kvlen'", "kvlen", None),
    (BIAS + 'kind = "normal"\nshape = ["heads"]\n', SpecError,
     "rank 2 in the spec", "[tensors.bias]", None),
    (BIAS + 'kind = "normal"\nshape = ["heads", "q_len + kv_len"]\nlearnable = true\n',
     SpecError, "size cannot depend on kv_len, q_len", "true", None),
    (BIAS + 'kind = "normal"\nshape = ["heads", 3]\nsdt = 1.0\n', SpecError,
     "has no option 'sdt'", "1.0", None),
    (BIAS + 'kind = "normal"\nshape = "heads"\n', SpecError,
     "shape must be a list", '"heads"', None),
    (BIAS + 'kind = "normal"\nshape = ["heads", 2.5]\n', SpecError,
     "a size is an integer", "2.5", None),
    (BIAS + 'kind = "normal"\n', SpecError, "'normal' needs 'shape'", "[tensors.bias]", None),
    ('spec = "score + bias[kv]"\n[tensors]\nbias = { kind = "documents", count = 3 }\n',
     SpecError, "'bias' holds floats in the spec, but 'documents' makes ints", "{ kind", None),
]


@pytest.mark.parametrize("text, error, message, token, line", ENTRY_ERRORS)
def test_errors_in_table_entries_point_at_the_entry(tmp_path, text, error, message, token,
                                                     line):
    path = write(tmp_path, "spec.toml", text)
    with pytest.raises(error, match=re.escape(message)) as info:
        read(path)
    assert_points_at(info.value, path, text, token, line)


def test_a_near_miss_entry_gets_a_hint():
    with pytest.raises(SpecError, match="unknown entry 'param'") as info:
        read({"spec": "where q - kv < W", "param": {"W": 3}})
    assert info.value.hint.startswith("did you mean 'params'?")


@pytest.mark.parametrize("name, text, line, column", [
    ("bad.toml", 'spec = "where q >= kv"\nparams = {W = }\n', 2, 15),
    ("bad.json", '{"spec": "where q >= kv",\n "params": {"W": }}\n', 2, 18),
    ("bad.yaml", "spec: where q >= kv\nparams: {W: 1\n", 3, 1),
])
def test_a_file_that_does_not_parse(tmp_path, name, text, line, column):
    path = write(tmp_path, name, text)
    with pytest.raises(SpecSyntaxError, match="not valid") as info:
        read(path)
    assert info.value.origin == f"{path}:{line}:{column}"


def test_errors_without_a_file_name_the_key():
    with pytest.raises(SpecTypeError) as info:
        read({"model": {"attention": TABLE | {"let": {"causal": "q >= x"}}}},
             key="model.attention")
    assert info.value.origin == "model.attention.let.causal"
    assert info.value.spec == "q >= x" and info.value.span == (5, 6)


# -- example tensors -----------------------------------------------------------------------------

def recipe_file(recipe: dict, spec: str = "score + table[kv]"):
    return read({"spec": spec, "tensors": {"table": recipe}})


def test_example_tensors_are_seeded_per_name():
    spec_file = read(TABLE)
    one = example_tensors(spec_file, q_len=50, kv_len=60, seed=3)["doc"]
    assert torch.equal(one, example_tensors(spec_file, q_len=50, kv_len=60, seed=3)["doc"])
    assert not torch.equal(one, example_tensors(spec_file, q_len=50, kv_len=60, seed=4)["doc"])
    assert one.shape == (60,) and one.dtype == torch.int64
    assert one.unique().tolist() == [0, 1, 2] and bool((one.diff() >= 0).all())


def test_alibi_slopes():
    spec_file = recipe_file({"kind": "alibi_slopes"}, "score + table[h]")
    slopes = example_tensors(spec_file, heads=8, dtype=torch.float64)["table"]
    assert slopes.tolist() == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads.
    slopes = example_tensors(spec_file, heads=6, dtype=torch.float64)["table"]
    assert slopes.tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_t5_buckets():
    spec_file = read({"spec": "score + table[bucket[q - kv + kv_len]]",
                      "tensors": {"bucket": {"kind": "t5_buckets", "length": "q_len + kv_len",
                                             "offset": "kv_len"}}})
    bucket = example_tensors(spec_file, q_len=600, kv_len=600, only=["bucket"])["bucket"]

    def at(q_minus_kv):
        return bucket[q_minus_kv + 600].item()
    # 32 buckets, both directions: 16 each; 8 exact, then logarithmic up to 128.
    assert [at(d) for d in range(8)] == list(range(8))
    assert [at(-d) for d in range(1, 8)] == list(range(17, 24))
    assert at(20) == 8 + int(math.log(20 / 8) / math.log(128 / 8) * 8) == 10
    assert at(127) == 15 and at(500) == 15 and at(-500) == 31


def test_sandwich_and_linspace():
    spec_file = read({"spec": "score + weight[h] * table[q - kv + kv_len]", "tensors": {
        "table": {"kind": "sandwich", "length": "q_len + kv_len", "offset": "kv_len",
                  "dim": 8},
        "weight": {"kind": "linspace", "length": "heads", "start": 0.5, "stop": 2.0}}})
    made = example_tensors(spec_file, heads=4, q_len=5, kv_len=7, dtype=torch.float64)
    table = made["table"]
    assert table[7].item() == 4.0  # distance 0: dim / 2 cosines of 0
    expected = sum(math.cos(3 / 10000 ** (2 * i / 8)) for i in range(1, 5))
    assert table[10].item() == pytest.approx(expected, abs=1e-12)
    assert made["weight"].tolist() == [0.5, 1.0, 1.5, 2.0]


def test_sizes_read_parameters_and_lengths():
    spec_file = read({"spec": "score + table[h, kv % NB]", "params": {"NB": 6},
                      "tensors": {"table": {"kind": "normal", "shape": ["heads", "NB * 2"]}}})
    assert example_tensors(spec_file, heads=3)["table"].shape == (3, 12)
    assert example_tensors(spec_file, heads=3, params={"NB": 2})["table"].shape == (3, 4)
    spec_file = recipe_file({"kind": "bernoulli", "shape": ["max(q_len, kv_len) - 1"],
                             "p": 1.0}, "where table[kv] == 1")
    made = example_tensors(spec_file, q_len=4, kv_len=9)["table"]
    assert made.tolist() == [1] * 8
    with pytest.raises(SpecError, match="needs kv_len, q_len to be made"):
        example_tensors(spec_file)


def test_every_kind_is_documented():
    assert all(kind.doc for kind in TENSOR_KINDS.values())


@pytest.mark.parametrize("recipe, message", [
    ('kind = "documents"\ncount = 0', "'count' is 0"),
    ('kind = "documents"\ncount = -3', "'count' is -3"),
    ('kind = "normal"\nshape = ["heads", "q_len + kv_len"]\nstd = -1.0', "'std' is -1.0"),
    ('kind = "normal"\nshape = ["heads", "q_len + kv_len"]\nstd = nan', "'std' is nan"),
    ('kind = "normal"\nshape = ["heads", "q_len // 0"]', "divides by zero"),
    ('kind = "normal"\nshape = ["heads", 100000000000]', "200,000,000,000 elements"),
])
def test_tensor_recipes_that_cannot_make_a_tensor_are_spec_errors(tmp_path, recipe, message):
    uses = "doc[q] == doc[kv]" if "documents" in recipe else "bias[h, q - kv + kv_len] > 0.5"
    name = "doc" if "documents" in recipe else "bias"
    path = tmp_path / "spec.toml"
    path.write_text(f'spec = "where {uses}"\n[tensors.{name}]\n{recipe}\n')
    with pytest.raises(flexdsl.SpecError, match=message):
        spec_file = read(str(path))
        example_tensors(spec_file, heads=2, q_len=8, kv_len=8)


def test_a_byte_order_mark_and_an_empty_spec(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes("\ufeffspec = \"where q >= kv\"\n".encode("utf-8"))
    assert read(str(path)).spec == "where q >= kv"
    path.write_text('spec = ""\n')
    with pytest.raises(flexdsl.SpecError, match="the spec is empty"):
        read(str(path))
