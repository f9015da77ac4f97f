"""The curve table: repeats grouped, share of the non-private gain against the right references."""

import json
import math

import pytest
from typer.testing import CliRunner

from bench.curve import _check_arms, app, arm_command, write_curve
from shared.errors import ConfigError, InputError


def _record(arm, f1s, *, patients=800, notes="/runs/x/data/site-a/notes.jsonl", overrides=None, eps=None):
    """A proxy.json as bench/proxy.py writes it, with the per-round F1 ``f1s`` (last = the run's)."""
    sigma = 0.0 if arm == "no-dp" else 1.0
    log = [{"round": i + 1, "sigma": sigma, "epsilon": math.inf if arm == "no-dp" else (eps or 7.9) * (i + 1) / len(f1s),
            "mean_loss": 1.0, "real_classifier_f1": f, "tstr_trtr": f, "centroid_margin": -0.01} for i, f in enumerate(f1s)]
    if arm == "zero-shot":
        log = []
    last = f1s[-1]
    return {"arm": arm, "notes": notes, "training_patients": patients, "rounds": len(log), "rounds_log": log,
            "overrides": overrides or {}, "real_classifier_f1": last, "tstr_trtr": last / 2, "centroid_margin": -0.01,
            "chance_f1": 1 / 13}


def _write(tmp_path, name, record):
    d = tmp_path / name
    d.mkdir()
    (d / "proxy.json").write_text(json.dumps(record))
    return d


def test_shares_repeats_and_references_have_the_known_answer(tmp_path):
    runs = [
        _write(tmp_path, "zs", _record("zero-shot", [0.1])),
        _write(tmp_path, "nodp", _record("no-dp", [0.2, 0.3, 0.5])),
        _write(tmp_path, "nodp5", _record("no-dp", [0.2, 0.4, 0.7, 0.8, 0.9])),  # its round 3 joins the reference
        # two repeats of one recipe: a speed-only override does not split them
        _write(tmp_path, "e8a", _record("eps-8", [0.1, 0.1, 0.2], overrides={"train.max-physical-batch-size": 16})),
        _write(tmp_path, "e8b", _record("eps-8", [0.1, 0.3, 0.4], eps=7.95)),
        _write(tmp_path, "e8r4", _record("eps-8", [0.1, 0.1, 0.35], overrides={"lora.r": 4})),  # another recipe
        # another notes source has its own references
        _write(tmp_path, "gzs", _record("zero-shot", [0.2], notes="/pub/other.jsonl")),
        _write(tmp_path, "gnodp", _record("no-dp", [0.3, 0.5, 0.6], notes="/pub/other.jsonl")),
        _write(tmp_path, "ge8", _record("eps-8", [0.2, 0.3, 0.3], notes="/pub/other.jsonl")),
    ]
    groups = write_curve(runs, tmp_path / "out")
    by = {(g.source, g.arm, tuple(sorted(g.recipe.items())), g.rounds): g for g in groups}
    e8 = by[("demo generator", "eps-8", (), 3)]
    assert e8.runs == ["e8a", "e8b"]
    assert e8.f1 == [0.2, 0.4] and e8.f1_per_round == pytest.approx([0.1, 0.2, 0.3])
    assert e8.epsilon == pytest.approx(7.95)
    # reference: zero-shot 0.1, no-DP at round 3 = mean(0.5, 0.7) = 0.6 -> (0.3 - 0.1) / 0.5
    assert e8.reference["no_dp_f1"] == pytest.approx(0.6) and e8.reference["no_dp_runs"] == ["nodp", "nodp5"]
    assert e8.share_of_gain == pytest.approx(0.4)
    # no reference measured with lora.r=4: the default recipe's references
    assert by[("demo generator", "eps-8", (("lora.r", 4),), 3)].share_of_gain == pytest.approx(0.5)
    assert by[("other.jsonl", "eps-8", (), 3)].share_of_gain == pytest.approx(0.25)  # (0.3 - 0.2) / (0.6 - 0.2)
    assert by[("demo generator", "zero-shot", (), 0)].share_of_gain is None
    assert by[("demo generator", "no-dp", (), 3)].share_of_gain is None  # the reference, not an arm against it
    table = (tmp_path / "out" / "curve.md").read_text()
    assert "| eps-8 | demo generator | 800 | default | 2 | 7.950 |" in table
    assert "0.300 (0.200–0.400)" in table and "| 40% |" in table and "| reference |" in table
    assert json.loads((tmp_path / "out" / "curve.json").read_text())[1]["epsilon"] == "inf"
    assert (tmp_path / "out" / "curve.png").stat().st_size > 10_000


def test_same_population_reference_is_preferred_and_missing_reference_gives_no_share(tmp_path):
    runs = [
        _write(tmp_path, "zs", _record("zero-shot", [0.1])),
        _write(tmp_path, "zs6k", _record("zero-shot", [0.3], patients=4800)),
        _write(tmp_path, "nodp", _record("no-dp", [0.2, 0.3, 0.5])),
        _write(tmp_path, "e8", _record("eps-8", [0.1, 0.1, 0.4], patients=4800)),
        _write(tmp_path, "lonely", _record("eps-8", [0.1, 0.1, 0.4], notes="/pub/other.jsonl")),
    ]
    groups = {g.runs[0]: g for g in write_curve(runs, tmp_path / "out")}
    assert groups["e8"].reference["zero_shot_runs"] == ["zs6k"]  # same patients when measured there
    assert groups["e8"].share_of_gain == pytest.approx((0.4 - 0.3) / (0.5 - 0.3))
    assert groups["lonely"].share_of_gain is None  # no reference from its own notes source: no share


def test_references_with_the_arms_own_recipe_come_first(tmp_path):
    tiny = {"train.steps": 2}
    runs = [
        _write(tmp_path, "zs", _record("zero-shot", [0.1])),
        _write(tmp_path, "nodp", _record("no-dp", [0.2, 0.3, 0.5])),
        _write(tmp_path, "zs-tiny", _record("zero-shot", [0.05], overrides=tiny)),
        _write(tmp_path, "nodp-tiny", _record("no-dp", [0.1, 0.2, 0.25], overrides=tiny)),
        _write(tmp_path, "e8-tiny", _record("eps-8", [0.1, 0.1, 0.1], overrides=tiny)),
        _write(tmp_path, "e8", _record("eps-8", [0.1, 0.1, 0.3])),
    ]
    groups = {g.runs[0]: g for g in write_curve(runs, tmp_path / "out")}
    assert groups["e8-tiny"].reference["no_dp_runs"] == ["nodp-tiny"]
    assert groups["e8-tiny"].share_of_gain == pytest.approx((0.1 - 0.05) / (0.25 - 0.05))
    assert groups["e8"].share_of_gain == pytest.approx((0.3 - 0.1) / (0.5 - 0.1))
    assert groups["nodp-tiny"].share_of_gain is None and groups["zs-tiny"].share_of_gain is None


def test_bad_runs_are_all_named_with_file_and_line(tmp_path):
    good = _write(tmp_path, "zs", _record("zero-shot", [0.1]))
    missing = tmp_path / "never-finished"
    missing.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "proxy.json").write_text('{\n  "arm": "eps-8",\n  oops\n}')
    partial = _write(tmp_path, "partial", {"arm": "eps-8"})
    with pytest.raises(InputError) as exc:
        write_curve([good, missing, broken, partial], tmp_path / "out")
    text = str(exc.value)
    assert f"{missing / 'proxy.json'}: no such file" in text
    assert f"{broken / 'proxy.json'}:3: not JSON" in text
    assert f"{partial / 'proxy.json'}: missing field(s): training_patients" in text
    assert not (tmp_path / "out").exists()  # nothing written from a partial read
    result = CliRunner().invoke(app, ["table", str(good), str(broken), "--out", str(tmp_path / "o2")])
    assert result.exit_code == InputError.exit_code
    assert "Traceback" not in result.output and "broken" in result.output


def test_run_refuses_a_used_output_before_any_work(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    for out in ("busy", "file"):
        result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / out), "--arm", "eps-8"])
        assert result.exit_code == ConfigError.exit_code and "not an empty directory" in result.output, out
        assert "Traceback" not in result.output
    for bad in (["--arm", "eps-x"], ["--arm", "eps-8", "--arm", "eps-8"], ["--set", "lora.r"],
                ["--set", "train.no-such-key=1"], ["--set", "lora.r=0"]):
        result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "new"), *bad])
        assert result.exit_code == ConfigError.exit_code, (bad, result.output)
        assert "Traceback" not in result.output and not (tmp_path / "new").exists(), bad


def test_arm_command_lines_and_arm_names(tmp_path):
    cmd = arm_command("eps-4", tmp_path, patients=1000, rounds=3, seed=0, sets=["lora.r=4"])
    assert cmd[cmd.index("--epsilon") + 1] == "4" and cmd[cmd.index("--out") + 1] == str(tmp_path)
    assert cmd[cmd.index("--set") + 1] == "lora.r=4" and "--no-dp" not in cmd
    assert "--no-dp" in arm_command("no-dp", tmp_path, patients=10, rounds=1, seed=0, sets=[])
    assert "--zero-shot" in arm_command("zero-shot", tmp_path, patients=10, rounds=1, seed=0, sets=[])
    _check_arms(["zero-shot", "no-dp", "eps-1", "eps-0.5"])
    with pytest.raises(ConfigError) as exc:
        _check_arms(["eps-0", "eps-x", "dp", "eps-inf"])
    assert len(exc.value.problems) == 4


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Optimal order")
def test_run_trains_the_arms_and_tabulates_them(tmp_path):
    tiny = ["train.steps=2", "train.max-length=64", "train.expected-batch-size=16", "train.max-physical-batch-size=16",
            "lora.r=1", "lora.alpha=2.0", "generate.max-new-tokens=16"]
    args = ["run", "--out", str(tmp_path / "c"), "--arm", "zero-shot", "--arm", "no-dp", "--arm", "eps-8",
            "--patients", "100", "--rounds", "1"]
    for kv in tiny:
        args += ["--set", kv]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert [g["arm"] for g in groups] == ["zero-shot", "no-dp", "eps-8"]
    zs, nodp, eps8 = groups
    assert zs["epsilon"] is None and nodp["epsilon"] == "inf" and 0 < eps8["epsilon"] <= 8
    assert len(eps8["f1"]) == 1 and math.isfinite(eps8["f1"][0])
    if nodp["f1"][0] > zs["f1"][0]:  # two tiny steps may not beat the base model; then there is no share to read
        assert eps8["reference"]["no_dp_round"] == 1  # read after the run's own rounds, not the default 3
        assert eps8["share_of_gain"] == pytest.approx((eps8["f1"][0] - zs["f1"][0]) / (nodp["f1"][0] - zs["f1"][0]))
    assert "| eps-8 | demo generator | 80 |" in result.output
