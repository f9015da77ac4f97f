"""``python bench/curve.py``: the privacy–utility curve of the default recipe, from proxy runs.

Issue #15, item 2: the ε arms (1, 4, 8; whole run, per site), the non-private
arm and the zero-shot base model side by side, on a public proxy site
(:mod:`bench.proxy`: never a site's notes), with the spread over repeats.

- ``run``: trains and scores every arm with ``bench/proxy.py`` on one proxy
  population, ``--parallel`` arms at a time (one torch thread each), then
  tabulates them. On the 2-core reference machine one 3 × 100-step arm takes
  about 50 minutes beside another (training and the per-round scores), so the
  default five arms take about 2 hours.
- ``table``: tabulates finished proxy runs (any mix of arms, populations and
  recipes; e.g. the patients-per-site axis at ε = 8) into ``DIR/curve.md``,
  ``DIR/curve.json`` and ``DIR/curve.png``.

Runs are grouped by what the recipe is (notes source, training patients, arm,
rounds, run-config overrides other than speed-only ones); a group of several
runs is a set of repeats, shown as its mean and range. DP noise is fresh from
the OS in every run, so repeats differ and no seed reproduces a DP arm exactly.

**Share of the non-private gain** (the ≥ 70 % goal at ε = 8):
``(F1_arm − F1_zero-shot) / (F1_no-DP − F1_zero-shot)``, with F1 the
real-note classifier's macro-F1 on code-masked reports, the zero-shot and
non-private references taken from the same notes source (the same training
patients when measured there) and the non-private F1 read after the same
number of rounds (``--reference-rounds``) from its learning curve.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/curve.py` finds bench/

from shared.errors import ConfigError, FedsynthError, InputError, Problem  # noqa: E402

SPEED_ONLY = frozenset({"train.max-physical-batch-size"})  # overrides that change speed, never the maths
DEFAULT_ARMS = ("zero-shot", "no-dp", "eps-1", "eps-4", "eps-8")
PROXY = Path(__file__).resolve().with_name("proxy.py")

app = typer.Typer(add_completion=False, no_args_is_help=True)


@dataclass
class Group:
    """Repeats of one recipe: same source, training patients, arm, rounds and overrides."""

    source: str
    training_patients: int
    arm: str
    rounds: int
    recipe: dict[str, Any]
    runs: list[str] = field(default_factory=list)
    epsilon: float | None = None  # the largest achieved whole-run ε over the repeats (None: no training)
    sigma: float | None = None
    chance_f1: float | None = None  # 1 / codes: the macro-F1 of guessing
    f1_per_round: list = field(default_factory=list)  # per round: mean over repeats (None: not scored)
    f1: list[float] = field(default_factory=list)  # one per repeat: the last round's
    tstr_trtr: list[float] = field(default_factory=list)
    centroid_margin: list[float] = field(default_factory=list)
    share_of_gain: float | None = None
    reference: dict[str, Any] | None = None

    @property
    def key(self) -> tuple:
        return (self.source, self.training_patients, self.arm, self.rounds, tuple(sorted(self.recipe.items())))


def _source(record: dict[str, Any]) -> str:
    if "notes" not in record:  # records from before --notes existed: always the demo generator's
        return "demo generator"
    notes = Path(str(record["notes"]))
    # bench/proxy.py writes the demo generator's population to <run>/data/site-a/notes.jsonl
    return "demo generator" if notes.parts[-3:] == ("data", "site-a", "notes.jsonl") else notes.name


def load_record(run_dir: Path) -> dict[str, Any]:
    """One finished proxy run's ``proxy.json``; an unreadable one is named with its reason."""
    path = run_dir / "proxy.json"
    if not path.is_file():
        raise InputError("not a finished proxy run", [Problem(str(path), "no such file")])
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError("unreadable proxy run", [Problem(str(path), f"not JSON: {exc.msg}", exc.lineno)]) from None
    missing = [k for k in ("arm", "training_patients", "rounds", "rounds_log", "real_classifier_f1",
                           "tstr_trtr", "centroid_margin") if k not in record] if isinstance(record, dict) else ["*"]
    if missing:
        raise InputError("not a proxy run record", [Problem(str(path), f"missing field(s): {', '.join(missing)}")])
    return record


def group_runs(records: list[tuple[str, dict[str, Any]]]) -> list[Group]:
    """Groups (run name, record) pairs into repeats of one recipe, in first-seen order."""
    groups: dict[tuple, Group] = {}
    for name, rec in records:
        recipe = _recipe(rec)
        g = Group(source=_source(rec), training_patients=int(rec["training_patients"]), arm=str(rec["arm"]),
                  rounds=int(rec["rounds"]), recipe=recipe)
        g = groups.setdefault(g.key, g)
        g.runs.append(name)
        g.chance_f1 = rec.get("chance_f1", g.chance_f1)
        log = rec["rounds_log"]
        if log:
            eps, g.sigma = float(log[-1]["epsilon"]), float(log[-1]["sigma"])
            g.epsilon = eps if g.epsilon is None else max(g.epsilon, eps)
        g.f1.append(float(rec["real_classifier_f1"]))
        g.tstr_trtr.append(float(rec["tstr_trtr"]))
        g.centroid_margin.append(float(rec["centroid_margin"]))
        rounds = [[] for _ in range(g.rounds)] if not g.f1_per_round else g.f1_per_round
        for i, entry in enumerate(log[:g.rounds]):
            if "real_classifier_f1" in entry:
                rounds[i].append(float(entry["real_classifier_f1"]))
        g.f1_per_round = rounds
    for g in groups.values():  # per-round scores of every repeat -> their means
        g.f1_per_round = [mean(r) if r else None for r in g.f1_per_round]
    return list(groups.values())


def _recipe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (record.get("overrides") or {}).items() if k not in SPEED_ONLY}


def _reference_f1(records: list[tuple[str, dict[str, Any]]], *, arm: str, source: str, patients: int,
                  recipe: dict[str, Any], at_round: int) -> tuple[float, list[str]] | None:
    """Mean F1 of the reference ``arm`` (zero-shot / no-dp) at ``at_round`` from ``source``'s notes.

    Closest first: the DP arm's own recipe overrides at its patients, its recipe at any
    patients, then the default recipe at its patients, the default recipe at any.
    """
    def scores(want_recipe: dict[str, Any], same_patients: bool) -> list[tuple[str, float]]:
        found = []
        for name, rec in records:
            if rec["arm"] != arm or _recipe(rec) != want_recipe or _source(rec) != source:
                continue
            if same_patients and int(rec["training_patients"]) != patients:
                continue
            if arm == "zero-shot":
                found.append((name, float(rec["real_classifier_f1"])))
            elif len(rec["rounds_log"]) >= at_round and "real_classifier_f1" in rec["rounds_log"][at_round - 1]:
                found.append((name, float(rec["rounds_log"][at_round - 1]["real_classifier_f1"])))
        return found

    found = (scores(recipe, True) or scores(recipe, False) or scores({}, True) or scores({}, False))
    return (mean(f for _, f in found), [n for n, _ in found]) if found else None


def add_shares(groups: list[Group], records: list[tuple[str, dict[str, Any]]], *, reference_rounds: int) -> None:
    """Each DP arm's share of the non-private gain over zero-shot (None where a reference is missing)."""
    for g in groups:
        if not g.arm.startswith("eps-"):
            continue  # zero-shot and no-DP rows are the references, not arms scored against them
        kw = {"source": g.source, "patients": g.training_patients, "recipe": g.recipe}
        zs = _reference_f1(records, arm="zero-shot", at_round=0, **kw)
        nodp = _reference_f1(records, arm="no-dp", at_round=reference_rounds, **kw)
        if zs is None or nodp is None or nodp[0] <= zs[0]:
            continue
        g.reference = {"zero_shot_f1": zs[0], "zero_shot_runs": zs[1], "no_dp_f1": nodp[0], "no_dp_runs": nodp[1],
                       "no_dp_round": reference_rounds}
        g.share_of_gain = (mean(g.f1) - zs[0]) / (nodp[0] - zs[0])


def _recipe_text(recipe: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(recipe.items())) or "default"


def _spread(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _eps(g: Group) -> str:
    if g.epsilon is None:
        return "—"
    return "∞ (no DP)" if math.isinf(g.epsilon) else f"{g.epsilon:.3f}"


def table_markdown(groups: list[Group]) -> str:
    """The curve as one markdown table: every arm side by side (means, range over repeats)."""
    head = ("| arm | notes | training patients | recipe overrides | runs | ε achieved | σ | F1 per round "
            "| real-classifier F1 | chance F1 | TSTR/TRTR | centroid margin | share of no-DP gain |")
    lines = [head, "|" + "---|" * 13]
    for g in groups:
        recipe = _recipe_text(g.recipe)
        per_round = " / ".join("—" if f is None else f"{f:.3f}" for f in g.f1_per_round) or "—"
        share = "—" if g.share_of_gain is None else f"{g.share_of_gain:.0%}"
        if g.arm in ("zero-shot", "no-dp"):
            share = "reference"
        sigma = "—" if g.sigma is None else f"{g.sigma:.2f}"
        chance = "—" if g.chance_f1 is None else f"{g.chance_f1:.3f}"
        lines.append(f"| {g.arm} | {g.source} | {g.training_patients:,} | {recipe} | {len(g.runs)} | {_eps(g)} "
                     f"| {sigma} | {per_round} | {_spread(g.f1)} | {chance} | {_spread(g.tstr_trtr)} "
                     f"| {_spread(g.centroid_margin)} | {share} |")
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], path: Path, *, rounds: int, source: str = "demo generator") -> None:
    """``source``'s arms of ``rounds`` rounds: F1 against ε per population, and at ε = 8 against patients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [g for g in groups if g.source == source and g.rounds in (0, rounds)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dp = [(g.training_patients, tuple(sorted(g.recipe.items()))) for g in mine if g.arm.startswith("eps-")]
    # a curve needs two ε values; one-point recipes (levers tried at one ε) are on the right panel
    lines = sorted({k for k in dp if dp.count(k) > 1}) or sorted(set(dp))
    for n, recipe in lines:  # one line per population and recipe
        pts = sorted((g.epsilon, mean(g.f1), min(g.f1), max(g.f1)) for g in mine
                     if g.arm.startswith("eps-") and (g.training_patients, tuple(sorted(g.recipe.items()))) == (n, recipe))
        x, y, lo, hi = zip(*pts, strict=True)
        err = [[a - b for a, b in zip(y, lo, strict=True)], [b - a for a, b in zip(y, hi, strict=True)]]
        label = f"DP, {n:,} training patients" + (f", {_recipe_text(dict(recipe))}" if recipe else "")
        left.errorbar(x, y, yerr=err, marker="o", capsize=3, label="\n".join(textwrap.wrap(label, 48)))
    refs = {(k, g.reference[k]) for g in mine if g.reference for k in ("no_dp_f1", "zero_shot_f1")}
    for k, f1 in sorted(refs):
        left.axhline(f1, linestyle="--" if k == "no_dp_f1" else ":", color="grey")
        left.annotate("no DP" if k == "no_dp_f1" else "zero-shot", (0.2, f1), fontsize=7, va="bottom")
    chance = next((g.chance_f1 for g in mine if g.chance_f1), None)
    if chance:
        left.axhline(chance, linestyle="-.", color="lightgrey")
        left.annotate("chance", (8.3, chance), fontsize=7, va="bottom")
    left.set(xlabel="whole-run ε per site", ylabel="real-classifier macro-F1 (codes masked)",
             title=f"{source}: F1 against ε ({rounds} rounds)", xlim=(0, 9), ylim=(0, None))
    if lines:
        left.legend(fontsize=6, loc="center right")
    for recipe in sorted({tuple(sorted(g.recipe.items())) for g in mine if g.arm == "eps-8"}):
        pts = sorted((g.training_patients, mean(g.f1)) for g in mine
                     if tuple(sorted(g.recipe.items())) == recipe and g.arm == "eps-8")
        x, y = zip(*pts, strict=True)
        right.plot(x, y, marker="o", label="\n".join(textwrap.wrap(_recipe_text(dict(recipe)), 48)))
    for k, f1 in sorted(refs):
        right.axhline(f1, linestyle="--" if k == "no_dp_f1" else ":", color="grey")
    right.set(xlabel="training patients per site", ylabel="real-classifier macro-F1",
              title="F1 at ε = 8 against patients", ylim=(0, None))
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curve(run_dirs: list[Path], out: Path, *, reference_rounds: int = 3) -> list[Group]:
    """Reads every run (all problems listed at once), writes curve.md / curve.json / curve.png to ``out``."""
    records, problems = [], []
    for d in run_dirs:
        try:
            records.append((d.name, load_record(d)))
        except InputError as exc:
            problems.extend(exc.problems)
    if problems:
        raise InputError(f"{len(problems)} run(s) could not be read", problems)
    if not records:
        raise ConfigError("no runs given")
    groups = group_runs(records)
    add_shares(groups, records, reference_rounds=reference_rounds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.md").write_text(table_markdown(groups))
    (out / "curve.json").write_text(json.dumps([_json_safe(asdict(g)) for g in groups], indent=2) + "\n")
    plot(groups, out / "curve.png", rounds=reference_rounds)
    return groups


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def arm_command(arm: str, run_dir: Path, *, patients: int, rounds: int, seed: int, sets: list[str]) -> list[str]:
    """The ``bench/proxy.py`` command line of one arm (zero-shot, no-dp or eps-<ε>)."""
    cmd = [sys.executable, str(PROXY), "--out", str(run_dir), "--patients", str(patients), "--rounds", str(rounds),
           "--seed", str(seed), "--score-rounds"]
    if arm == "zero-shot":
        cmd.append("--zero-shot")
    elif arm == "no-dp":
        cmd.append("--no-dp")
    elif arm.startswith("eps-"):
        cmd += ["--epsilon", arm[4:]]
    for kv in sets:
        cmd += ["--set", kv]
    return cmd


def _check_arms(arms: list[str]) -> None:
    bad = []
    for arm in arms:
        if arm in ("zero-shot", "no-dp"):
            continue
        try:
            ok = arm.startswith("eps-") and 0 < float(arm[4:]) < math.inf
        except ValueError:
            ok = False
        if not ok:
            bad.append(Problem("--arm", f"{arm!r} is not zero-shot, no-dp or eps-<positive number>"))
    bad += [Problem("--arm", f"{arm!r} given twice (use --repeats)") for arm in sorted(set(arms))
            if arms.count(arm) > 1]
    if bad:
        raise ConfigError("bad arm(s)", bad)


def _check_sets(sets: list[str]) -> None:
    """Every ``--set`` is KEY=VALUE of a known run-config key with a valid value (bench/proxy.py's rules)."""
    from bench.proxy import _scalar
    from shared.run_config import RunConfig, with_overrides

    bad = [kv for kv in sets if "=" not in kv]
    if bad:
        raise ConfigError("bad --set", [Problem("--set", f"expected KEY=VALUE, got {kv!r}") for kv in bad])
    with_overrides(RunConfig(), {"min-sites": 1, **{k: _scalar(v) for k, v in (kv.split("=", 1) for kv in sets)}})


@app.command("run")
def run_command(
    out: Annotated[Path, typer.Option(help="Curve directory (must be new or empty): one run per arm inside.")],
    arm: Annotated[list[str], typer.Option(help="Arms (repeatable); default: " + ", ".join(DEFAULT_ARMS))] = [],  # noqa: B006
    patients: Annotated[int, typer.Option(help="Patients at the proxy site (80% train).")] = 1000,
    rounds: Annotated[int, typer.Option(help="Rounds per trained arm.")] = 3,
    repeats: Annotated[int, typer.Option(help="Runs per trained arm (DP noise is fresh in each).")] = 1,
    parallel: Annotated[int, typer.Option(help="Arms at a time (one torch thread each).")] = 2,
    seed: Annotated[int, typer.Option(help="Proxy population and scoring seed (bench/proxy.py --seed).")] = 0,
    set_: Annotated[list[str], typer.Option("--set", help="Run-config override KEY=VALUE for every arm.")] = [],  # noqa: B006
) -> None:
    """Run the curve's arms on one proxy population, then tabulate them."""
    arms = arm or list(DEFAULT_ARMS)
    try:
        _check_arms(arms)
        _check_sets(set_)
        if min(repeats, parallel, rounds, patients) < 1:
            raise ConfigError("--repeats, --parallel, --rounds and --patients must be at least 1")
        out = out.resolve()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"{out} exists and is not an empty directory")
        jobs = [(a, out / (a if a == "zero-shot" or repeats == 1 else f"{a}-{k + 1}"))
                for a in arms for k in range(1 if a == "zero-shot" else repeats)]
        out.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                            "FLWR_TELEMETRY_ENABLED": "0"}

        def one(job: tuple[str, Path]) -> tuple[str, int]:
            a, run_dir = job
            with (out / f"{run_dir.name}.log").open("w") as log:
                cmd = arm_command(a, run_dir, patients=patients, rounds=rounds, seed=seed, sets=set_)
                return run_dir.name, subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            failed = [(name, rc) for name, rc in pool.map(one, jobs) if rc != 0]
        if failed:
            raise InputError("proxy run(s) failed; see their logs", [
                Problem(str(out / f"{name}.log"), f"exit {rc}") for name, rc in failed])
        groups = write_curve([d for _, d in jobs], out, reference_rounds=rounds)
    except FedsynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(table_markdown(groups))


@app.command("table")
def table_command(
    runs: Annotated[list[Path], typer.Argument(help="Finished proxy run directories (each with proxy.json).")],
    out: Annotated[Path, typer.Option(help="Where curve.md, curve.json and curve.png go.")],
    reference_rounds: Annotated[int, typer.Option(help="Rounds at which the no-DP reference F1 is read.")] = 3,
) -> None:
    """Tabulate finished proxy runs side by side: the curve, the patients axis, the spread over repeats."""
    try:
        groups = write_curve(runs, out, reference_rounds=reference_rounds)
    except FedsynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(table_markdown(groups))


if __name__ == "__main__":
    app()
