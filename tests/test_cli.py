"""``flexdsl check``: issue 2, items 2 and 3. Exit 0 with the signature, 1 with the caret
message for a bad spec, 2 for a bad command line."""
import pathlib
import subprocess
import sys

import pytest

from flexdsl import cli

ISSUE_SPEC = "score + slope[h]*(kv-q) where q>=kv and doc[q]==doc[kv]"
ROOT = pathlib.Path(__file__).parent.parent


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_issue_spec_lists_its_tensors(capsys):
    code, out, err = run(capsys, "check", ISSUE_SPEC)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "spec: score + slope[h] * (kv - q) where q >= kv and doc[q] == doc[kv]"
    assert "  tensor    slope: float, rank 1, indexed by [h]" in lines
    assert "  tensor    doc: int, rank 1, indexed by [q] and by [kv]" in lines


def test_index_ranges_are_printed(capsys):
    code, out, _ = run(capsys, "check", "score + bias[h, q - kv + kv_len]")
    assert code == 0
    assert ("  index     bias dim 1: q - kv + kv_len in [1, kv_len + q_len - 1], "
            "needs size >= kv_len + q_len") in out.splitlines()


def test_the_score_treatment_is_printed(capsys):
    _, out, _ = run(capsys, "check", ISSUE_SPEC)
    assert ("score: the bias slope[h] * (kv - q) splits into a query part and a key part: the "
            "kernels add the key part per element and the query part to lse") in out.splitlines()
    _, out, _ = run(capsys, "check", "cap * tanh(score / cap) where q >= kv")
    assert "score: d/d score = 1 - tanh(score / cap) ** 2 (the backward scales dP by it)" \
        in out.splitlines()
    _, out, _ = run(capsys, "check", "score + pad[b, kv]")   # may hold -inf: not split
    assert not any(line.startswith("score:") for line in out.splitlines())


def test_the_hopper_forward_is_named(capsys):
    _, out, _ = run(capsys, "check", "where kv <= q")
    assert "forward: causal attention: on an H100/H200 the hand-written" in out
    _, out, _ = run(capsys, "check", "where q > kv")
    assert "forward:" not in out


def test_terms_read_per_diagonal_are_printed(capsys):
    _, out, _ = run(capsys, "check", "score + bias[h, q - kv + kv_len]")
    assert ("diagonal: bias[h, q - kv + kv_len] depends on q - kv alone: the kernels evaluate "
            "it once per diagonal of a tile and spread it with a gather") in out.splitlines()
    _, out, _ = run(capsys, "check", "where abs(q - kv) <= W and (q - kv) % D == 0")
    assert any(line.startswith("diagonal: abs(q - kv) <= W and (q - kv) % D == 0")
               for line in out.splitlines())
    _, out, _ = run(capsys, "check", ISSUE_SPEC)
    assert not any(line.startswith("diagonal:") for line in out.splitlines())


def test_parameters_are_typed_and_bound(capsys):
    code, out, _ = run(capsys, "check", "cap * tanh(score / cap) where 0 <= q - kv < W",
                       "-p", "W=128", "--param", "cap=30")
    assert code == 0
    lines = out.splitlines()
    assert "  parameter cap: float" in lines and "  parameter W: int" in lines
    assert "bound: W=128, cap=30.0" in lines


def test_a_spec_without_names(capsys):
    code, out, _ = run(capsys, "check", "where q >= kv")
    assert code == 0
    assert out.splitlines()[:2] == ["spec: where q >= kv", "signature: no parameters or tensors"]


def test_unknown_name_exits_1_with_the_caret_under_x(capsys):
    code, out, err = run(capsys, "check", "score + slope[x] where q>=kv")
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == "error: unknown name 'x'"
    assert lines[1] == "  score + slope[x] where q>=kv"
    assert lines[2] == "  " + " " * lines[1][2:].index("x") + "^"
    assert lines[3].startswith("hint: ") and "did you mean 'h'?" in lines[3]


@pytest.mark.parametrize("argv, message", [
    (["check", "where q = kv"], "error: '=' is not a comparison"),
    (["check", ""], "error: the spec is empty"),
    (["check", "where q < W", "-p", "W=2.5"], "error: parameter 'W' is an int, got 2.5"),
    (["check", "where q < W", "-p", "V=2"], "error: unknown parameter or tensor 'V'"),
    (["check", "score + slope[h]", "-p", "slope=2"], "error: 'slope' is a tensor, not a parameter"),
    (["check", "no_such_spec.toml"], "error: no such spec file: no_such_spec.toml"),
])
def test_bad_specs_exit_1(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.splitlines()[0] == message


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["check"], "the following arguments are required: spec"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["check", "where q < W", "-p", "W"], "expected NAME=VALUE, got 'W'"),
    (["check", "where q < W", "-p", "W=x"], "W: 'x' is not a number"),
])
def test_bad_usage_exits_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_spec_file(capsys):
    code, out, _ = run(capsys, "check", str(ROOT / "specs" / "causal.toml"))
    assert code == 0
    assert out.splitlines()[0] == "spec: where q >= kv"


def flexdsl_command() -> list[str]:
    """The installed console script, or the module where no script was installed."""
    script = pathlib.Path(sys.executable).parent / "flexdsl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flexdsl.cli"]


def test_the_installed_command(tmp_path):
    def flexdsl(*argv):
        return subprocess.run([*flexdsl_command(), *argv], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    ok = flexdsl("check", ISSUE_SPEC)
    assert ok.returncode == 0, ok.stderr
    assert "tensor    doc: int, rank 1, indexed by [q] and by [kv]" in ok.stdout

    bad = flexdsl("check", "score + slope[x] where q>=kv")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines()[1:3] == ["  score + slope[x] where q>=kv",
                                            "                ^"]

    usage = flexdsl("check")
    assert usage.returncode == 2 and "usage: flexdsl" in usage.stderr


def test_sizes_past_what_can_be_shown_are_refused_before_any_work(capsys):
    code, _, err = run(capsys, "show", "where q >= kv", "--q-len", "100000000", "--tile", "1",
                       "--quiet")
    assert code == 1 and "too many to show" in err and "Traceback" not in err
    with pytest.raises(SystemExit):   # argparse: exit 2 with a message
        cli.main(["show", "where q >= kv", "--q-len", str(10 ** 22)])
    assert "too large" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_a_traceback():
    # `flexdsl show ... | head -1`: the pipe closes while the plan is printed.
    shown = subprocess.run(
        f"{sys.executable} -c 'import sys; from flexdsl.cli import main; sys.exit(main())' "
        "show 'where 0 <= q - kv < 8' --q-len 4096 --tile 8 --quiet | head -1", shell=True,
        capture_output=True, text=True, cwd=ROOT)
    assert shown.stdout.startswith("spec:") and "Traceback" not in shown.stderr


def test_index_ranges_where_the_mask_keeps_are_printed(capsys):
    code, out, _ = run(capsys, "check", "score + bias[h, q - kv + W] where abs(q - kv) <= W")
    assert code == 0
    assert ("  index     bias dim 1: q - kv + W in [W + Max(-W, 1 - kv_len), W + Min(W, q_len - 1)]"
            " where the mask keeps a position, needs size >= W + Min(W, q_len - 1) + 1"
            ) in out.splitlines()
    # Bounds through a floor are not used (sound, not tight): the whole range is printed.
    _, out, _ = run(capsys, "check", "score + bias[q - kv + kv_len] where q // C >= kv // C")
    assert ("  index     bias dim 0: q - kv + kv_len in [1, kv_len + q_len - 1], needs size >= "
            "kv_len + q_len") in out.splitlines()
