"""The inspection verbs from the command line: models, summary, paper; errors exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from densenets.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_table_and_json(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "densenet121" in out and "7,978,856" in out
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["densenet169"]["params"] == 14_149_480
    assert rows["densenet-bc-100-k12"]["input_size"] == [3, 32, 32]
    assert 2.83e9 <= rows["densenet121"]["macs"] <= 2.87e9


def test_summary_table_and_json_with_overrides(capsys):
    code, out, _ = run(capsys, "summary", "densenet121", "--growth-rate", "12", "--json")
    assert code == 0
    d = json.loads(out)
    layers = [r for r in d["rows"] if r["kind"].startswith("dense layer")]
    assert [r["output_shape"][1] for r in layers[:6]] == [76, 88, 100, 112, 124, 136]
    trans = [r for r in d["rows"] if r["kind"] == "transition"]
    assert trans[0]["output_shape"] == [1, 68, 28, 28]
    code, out, _ = run(capsys, "summary", "densenet-bc", "--depth", "40", "--in-channels", "1",
                       "--input-size", "1", "8", "8")
    assert code == 0 and "densenet-bc-40-k12" in out and "1x24x8x8" in out


def test_summary_block_config_and_compression(capsys):
    code, out, _ = run(capsys, "summary", "densenet121", "--block-config", "2", "3",
                       "--compression", "0.25", "--json")
    d = json.loads(out)
    assert [r["name"] for r in d["rows"] if r["kind"].startswith("dense block")] == [
        "denseblock1", "denseblock2"]
    assert d["rows"][-3]["output_shape"][1] == (64 + 64) // 4 + 96  # transition, then block 2


def test_paper_tables(capsys):
    code, out, _ = run(capsys, "paper")
    assert code == 0
    for text in ("Table 1", "Table 2", "25.02 / 23.61", "densenet-bc-190-k40", "17.18"):
        assert text in out
    assert "NO" not in out  # no configuration mismatches its published parameter count
    code, out, _ = run(capsys, "paper", "--json")
    d = json.loads(out)
    assert all(r["params_match"] for r in d["table1"] + d["table2"])
    assert len(d["table2"]) == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["summary", "densenet12"], "Did you mean densenet121"),
        (["summary", "densenet-bc-101-k12"], "Valid depths near it: 100 and 106"),
        (["summary", "densenet-bc", "--depth", "50"], "Valid depths near it: 46 and 52"),
        (["summary", "densenet-bc"], "needs --depth"),
        (["summary", "densenet121", "--growth-rate", "0"], "growth_rate must be >= 1"),
        (["summary", "densenet121", "--compression", "0"], "compression"),
        (["summary", "densenet121", "--input-size", "3", "16", "16"], "minimum is 29x29"),
        (["summary", "densenet121", "--in-channels", "1", "--input-size", "3", "64", "64"],
         "takes 1-channel images"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_console_script_and_module_entry():
    script = str(Path(sys.executable).with_name("densenets"))
    p = subprocess.run([script, "summary", "densenet-bc-100-k12", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["total_params"] == 769_162
    # the module entry (each start imports torch: ~8 s here, so one call for both checks)
    p = subprocess.run([sys.executable, "-m", "densenets", "summary", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown model" in p.stderr


def test_every_verb_has_help(capsys):
    from densenets.cli import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert {"models", "summary", "paper"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "usage: densenets " + verb in capsys.readouterr().out


ARCHITECTURE_VERBS = ("train", "summary", "export", "predict", "reuse", "diagram")


def _architecture_flags(verb: str) -> dict[str, tuple[str, ...]]:
    from densenets.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    group = next(g for g in sub._action_groups if g.title == "architecture overrides")
    return {a.dest: tuple(a.option_strings) for a in group._group_actions}


def test_every_verb_that_builds_a_model_takes_the_same_architecture_flags():
    from densenets.models.densenet import DenseNetConfig

    flags = {verb: _architecture_flags(verb) for verb in ARCHITECTURE_VERBS}
    assert all(f == flags["train"] for f in flags.values()), flags
    # Each sets the configuration field of its name (depth picks a variant's blocks instead).
    fields = {f for f in DenseNetConfig.__dataclass_fields__}
    assert set(flags["train"]) - {"depth"} <= fields, set(flags["train"]) - fields
    assert flags["train"]["growth_rate"] == ("--growth-rate", "-k")
    assert flags["train"]["num_init_features"] == ("--init-features",)


def test_architecture_flags_reach_the_model_of_every_verb(tmp_path, capsys):
    code, out, _ = run(capsys, "summary", "densenet-bc", "--depth", "16", "-k", "4",
                       "--block-config", "3", "3", "3", "--init-features", "8", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["model"] == "densenet-bc-16-k4"
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["conv0"]["output_shape"][1] == 8  # --init-features
    assert rows["denseblock1"]["kind"] == "dense block (3 layers)"  # --block-config
    assert rows["denselayer1"]["kind"] == "dense layer (+4)"  # -k
    code, _, err = run(capsys, "export", "densenet121", "--depth", "40", "-o",
                       str(tmp_path / "x.onnx"))
    assert code == 2 and "--depth applies to a variant name" in err
