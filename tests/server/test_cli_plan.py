"""fedsynth-coordinator plan: output, exit codes, errors."""

from typer.testing import CliRunner

import server.cli as cli


def test_plan_prints_sigma_rounds_and_measurement():
    got = CliRunner().invoke(cli.app, ["plan", "--patients", "64", "--epsilon", "4", "--rounds", "2",
                                       "--batch", "16", "--steps", "30", "--accountant", "rdp",
                                       "--adapter-params", "49152"])
    assert got.exit_code == 0, got.output
    out = got.output
    for needle in ("σ (noise multiplier)", "ε per round (training)", "train.epsilon-per-round",
                   "ε per evaluation release", "noise-to-signal per step", "'DP ε = 4'"):
        assert needle in out, needle
    assert out.count("\n      ") >= 2  # two round rows


def test_plan_bad_input_exits_2_naming_each_problem():
    got = CliRunner().invoke(cli.app, ["plan", "--patients", "0", "--epsilon", "-1", "--rounds", "2",
                                       "--batch", "16", "--accountant", "gdp", "--adapter-params", "10"])
    assert got.exit_code == 2
    for needle in ("patients", "epsilon", "accountant"):
        assert needle in got.output
    missing = CliRunner().invoke(cli.app, ["plan", "--patients", "64"])
    assert missing.exit_code == 2 and "--epsilon" in missing.output
    unreachable = CliRunner().invoke(cli.app, ["plan", "--patients", "10", "--epsilon", "0.001",
                                               "--rounds", "100", "--batch", "10", "--accountant", "rdp",
                                               "--adapter-params", "10"])
    assert unreachable.exit_code == 5 and "unreachable" in unreachable.output


def test_documented_command_runs():
    """The command docs/coordinator.md shows for coordinators, as written; README lists it."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "coordinator.md").read_text(encoding="utf-8")
    assert "## Plan before you spend" in doc
    line = next(x for x in doc.split("## Plan before you spend", 1)[1].splitlines()
                if x.startswith("fedsynth-coordinator plan "))
    args = shlex.split(line.split("#")[0])[1:]
    got = CliRunner().invoke(cli.app, [*args, "--adapter-params", "49152"])
    assert got.exit_code == 0, got.output
    assert "σ (noise multiplier)" in got.output
    assert "fedsynth-coordinator plan --patients" in (root / "README.md").read_text(encoding="utf-8")
