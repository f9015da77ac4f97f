"""``python bench/study.py``: what ε buys, measured on the demo consortium.

An experiment, not a coordinator or site command: its site driver runs both
sides' functions, so it lives in ``bench/`` (outside the client/server import
rule) rather than in ``server/``.

The study runs the fictional three-hospital consortium (each site's canaries
planted in 1, 5 and 10 different training patients) once per setting, on the
same data, seeds and built embedded model, two settings at a time (each arm is
one single-threaded process), and tabulates the last round's evaluation of
every site:

- ``zero-shot``: the base model, no fine-tuning (one evaluation, no adapter);
- ``eps-1``, ``eps-4``, ``eps-8``: DP-LoRA, each site spending at most that ε
  over the **whole run** (``train.epsilon-per-round`` chosen so the ledger's
  composed total lands at or under it, see :func:`per_round_epsilon`);
- ``no-dp``: the NON-PRIVATE baseline (``train_local_round(..., private=False)``: no
  clipping, no noise, no ledger entry). Its updates are checked by the wire
  contract like the others and must be refused (zero noise / infinite ε);
- ``no-dp-long``: the memorization probe, the non-private baseline with
  200 instead of 30 steps per round (not part of the ε comparison: the known answer of whether the
  leakage metrics move when a model trains long enough to memorize).

Every arm runs in a site driver: one separate process that plays the three
sites with the functions the ClientApp calls (:func:`client.site.site_train`,
ledger and audit log included; :func:`client.site.site_evaluate`), checks each
train reply with :func:`shared.wire.check_reply`, aggregates with the
coordinator's :func:`server.strategy.aggregate` and evaluates once after the
last round, so the arms differ only in their DP knobs. ``--flower`` sends the
DP arms through ``flwr run`` (Flower simulation: the deployment's ServerApp
and transport) instead; that evaluates after every round and is slower. This
process never imports site code itself.
Output: ``DIR/study.json`` (every number), ``DIR/study.md`` (the table) and
``DIR/results-*.png`` (figures); each setting's run under ``DIR/<setting>/``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from server.simulation import BIN, PROJECT, run_command, run_simulation
from shared.errors import ConfigError, FedsynthError
from shared.settings import SiteSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/study.py` finds bench/
from bench.study_tables import (  # noqa: E402
    CANARY_REPETITIONS,
    COLUMNS,
    DISPLAY_ORDER,
    SettingResult,
    _achieved_epsilon,
    _json_safe,
    collect,
    write_outputs,
)

console = Console()
err = Console(stderr=True)

DP_EPSILONS = (1.0, 4.0, 8.0)  # per site, over the whole run, at the site's delta

# The memorization probe: no DP, 200 instead of 30 steps per round. Not part of the
# ε comparison (other knobs); it shows whether the leakage metrics move when a model
# is trained long enough to memorize -- the known answer the other rows are read against.
PROBE_OVERRIDES = {"train.steps": 200}


@dataclass(frozen=True)
class StudyPlan:
    """What one study runs. ``run_config`` is shared by every arm (kebab-case keys)."""

    settings: tuple[str, ...]
    rounds: int
    run_config: dict[str, Any]
    patients_per_site: int
    seed: int = 0


def plan(*, reduced: bool, seed: int = 0) -> StudyPlan:
    """Full study (2 CPU cores, ~25 min) or the reduced CI version (two settings, 1 round)."""
    # Explicit overrides of the run config's defaults (shared/run_config.py; pyproject.toml repeats
    # them), and why: the study must fit ~25 minutes on a 2-core laptop, and its sites are small.
    config: dict[str, Any] = {
        "min-sites": 3,  # every demo site in every round
        "train.steps": 30,  # default 100: six arms x 2 rounds x 3 sites on 2 cores
        # default 64 needs 128 training patients per site (q <= 1/2); the study's sites have 64
        "train.expected-batch-size": 16,
        "train.max-physical-batch-size": 16,  # one physical batch per step: faster on CPU
        "train.max-length": 256,  # default 448: shorter windows, faster steps
        "lora.r": 8,  # default 16: half the adapter, half the per-step cost
        "lora.alpha": 16.0,  # default 32: the recipe's scale alpha/r = 2 at r 8
        "generate.reports-per-code": 2,  # default 20: evaluation time
        "generate.max-new-tokens": 128,  # default 256: evaluation time
        "generate.seed": seed,  # the study's seed (the run's generation and LoRA init)
        "lora.init-seed": seed,
    }
    if reduced:
        config |= {"train.steps": 3, "generate.max-new-tokens": 48, "train.max-length": 192}
        return StudyPlan(settings=("eps-8", "no-dp"), rounds=1, run_config=config,
                         patients_per_site=60, seed=seed)
    # 80 patients per site: 64 train (q = 16/64), 16 held out -- smaller than the demo's
    # 120 so that the six settings fit in ~25 minutes on 2 CPU cores. Run order: zero-shot
    # alone first (it builds the embedding caches), then the longest arm (the probe) beside
    # the others, two at a time; tables sort by DISPLAY_ORDER.
    return StudyPlan(settings=("zero-shot", "no-dp-long", "no-dp", "eps-8", "eps-4", "eps-1"), rounds=2,
                     run_config=config, patients_per_site=80, seed=seed)


# ---- per-round ε for a whole-run target --------------------------------------


def training_patients(notes_path: Path, *, heldout_fraction: float) -> int:
    """Training patients a site will have: distinct ``patient_id`` minus the held-out share.

    Mirrors the site's split rule (``round(fraction·n)`` held out, at least 1,
    at most n−1); the study checks the achieved ε from the replies afterwards.
    """
    patients = set()
    with open(notes_path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                patients.add(json.loads(line)["patient_id"])
    n = len(patients)
    return n - min(max(round(heldout_fraction * n), 1), n - 1)


@functools.lru_cache(maxsize=64)  # sites of one size share the answer (each costs seconds)
def per_round_epsilon(
    total_epsilon: float, *, n_train: int, batch: int, steps: int, rounds: int, accountant: str = "prv"
) -> tuple[float, float]:
    """(per-round ε target, whole-run ε it leads to) for one site.

    The site turns ``train.epsilon-per-round`` e into the smallest σ (Opacus'
    bisection, 0.01 tolerance) whose round costs at most e, and its ledger
    composes the rounds with the accountant, which costs less than rounds × e.
    So: σ* = the σ whose ``rounds·steps`` steps cost ``total_epsilon`` (the same
    bisection over the whole run), e = the cost of one round at σ*. The site's
    σ for e is then ≥ σ*, so its ledger total is ≤ ``total_epsilon``; the
    returned total is that ledger total, recomputed here. δ and q are the site's
    (``default_delta`` of the patients bucket, ``sample_rate_for``).
    """
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier

    from client.dp.sampling import patients_bucket, sample_rate_for
    from client.site import default_delta

    delta = default_delta(patients_bucket(n_train))  # the site default
    q = sample_rate_for(n_train, batch)  # what train_dp charges

    def cost(sigma: float, n_steps: int) -> float:
        acc = create_accountant(mechanism=accountant)
        acc.history = [(sigma, q, n_steps)]
        return float(acc.get_epsilon(delta=delta))

    sigma_star = get_noise_multiplier(target_epsilon=total_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps * rounds, accountant=accountant)
    e = cost(sigma_star, steps)
    site_sigma = get_noise_multiplier(target_epsilon=e, target_delta=delta, sample_rate=q, steps=steps,
                                      accountant=accountant)
    achieved = cost(site_sigma, steps * rounds)  # the ledger merges equal (σ, q) runs the same way
    if achieved > total_epsilon:
        raise FedsynthError(f"per-round ε {e:g} would compose to {achieved:g} > {total_epsilon:g}")
    return e, achieved


# ---- running the arms ----------------------------------------------------------


def _env(home: Path) -> dict[str, str]:
    return os.environ | {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _federated_arm(arm_dir: Path, config: dict[str, Any], *, n_sites: int) -> dict[str, Any]:
    """One DP arm through ``flwr run`` (Flower simulation); returns the consortium summary."""
    sites_dir, coord_dir = arm_dir / "sites", arm_dir / "coordinator"
    coord_dir.mkdir(parents=True, exist_ok=True)
    log_path = arm_dir / "run.log"
    env = _env(arm_dir / ".flwr") | {"FEDSYNTH_SIM_ROOT": str(sites_dir), "FEDSYNTH_COORD_RUN_DIR": str(coord_dir)}
    run_simulation(work_dir=arm_dir, federation="study", n_sites=n_sites, run_config=config, env=env,
                   superlink_log=log_path, flwr_log=log_path)
    summary_path = coord_dir / str(config["run-name"]) / "consortium-summary.json"
    if not summary_path.exists():
        raise FedsynthError(f"{arm_dir.name}: the run wrote no consortium summary; see {log_path}")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed":
        raise FedsynthError(f"{arm_dir.name}: run status {summary.get('status')!r}; see {log_path}")
    return summary


# The in-process arms: for every site, in one separate process (this one never
# imports site code), the functions the ClientApp calls -- site_train (DP: ledger
# first, audit log) and site_evaluate -- with each train reply checked by the wire
# contract, aggregated by the coordinator's own strategy, evaluated once after the
# last round. The no-DP update is checked too, and must be refused: it is not private.
_SITE_DRIVER = r"""
import json, sys
from dataclasses import replace
import numpy as np
from client import site
from client.node_config import site_settings
from server.strategy import aggregate, site_weights
from shared import wire, wire_pack
from shared.errors import WireError
from shared.run_config import RunConfig

args = json.loads(sys.argv[1])
run = RunConfig.from_flower(args["run_config"])
sites = [site_settings({"partition-id": i, "num-partitions": args["sites"]}) for i in range(args["sites"])]
report = {"mode": args["mode"], "privacy": {}, "wire_refused": {}}
adapter = None
for rnd in range(1, run.num_rounds + 1 if args["mode"] != "zero-shot" else 1):
    updates, buckets = [], []
    for s in sites:
        if args["mode"] == "dp":
            update, privacy = site.site_train(s, run, global_adapter=adapter, round_id=rnd)
        else:  # NON-PRIVATE baseline: no clipping, no noise, no ledger entry
            nodp = replace(run, train=replace(run.train, noise_multiplier=0.0, epsilon_per_round=0.0))
            res = site.train_local_round(s, nodp, round_id=rnd, global_adapter=adapter, private=False)
            if res.ledger_entry is not None or res.privacy.private:
                raise SystemExit("the non-private baseline reserved privacy budget")
            update = {k: v.detach().float().cpu().numpy() for k, v in res.adapter.items()}
            privacy = res.privacy.to_record()
        update = {k: v.astype(run.lora.dtype) for k, v in update.items()}
        try:
            reply = wire.check_reply(wire_pack.pack_train_reply(update, privacy), kind="train",
                                     spec=site.adapter_spec(s, run), run=run)
            report["wire_refused"][s.site_id] = False
            if args["mode"] == "dp":  # as the ClientApp: released only after the wire check
                site.release_update(s, reply.privacy)
        except WireError:
            report["wire_refused"][s.site_id] = True
            if args["mode"] == "dp":
                raise
        report["privacy"][s.site_id] = {k: v for k, v in privacy.items()
                                        if not isinstance(v, float) or np.isfinite(v)}
        updates.append(update)
        buckets.append(int(privacy["patients_bucket"]))
    adapter = aggregate(updates, weights=site_weights(buckets, scheme=run.weighting, cap=run.weight_cap),
                        reference=adapter, method=run.aggregation, trim_fraction=run.trim_fraction,
                        norm_bound=run.update_norm_bound, dtype=run.lora.dtype)
    print(f"{args['mode']} round {rnd}/{run.num_rounds} aggregated", flush=True)
for s in sites:
    site.site_evaluate(s, run, global_adapter=adapter, round_id=run.num_rounds if adapter is not None else 0)
with open(args["report"], "w") as fh:
    json.dump(report, fh, indent=2)
"""


def _driver_arm(arm_dir: Path, config: dict[str, Any], *, mode: str, n_sites: int) -> dict[str, Any]:
    """Run one arm in the site driver (``mode``: zero-shot, dp, no-dp); returns its report."""
    # One torch thread (from _env): with a second OpenMP thread on 2 shared cores the tiny
    # model's small matrix products spent most of their time spinning (~10x slower, measured).
    env = _env(arm_dir / ".flwr") | {"FEDSYNTH_SIM_ROOT": str(arm_dir / "sites")}
    report = arm_dir / "driver-report.json"
    args = json.dumps({"run_config": config, "mode": mode, "sites": n_sites, "report": str(report)})
    run_command([sys.executable, "-c", _SITE_DRIVER, args], env=env, what=f"the {mode} arm", cwd=PROJECT,
         log=arm_dir / "run.log")
    return json.loads(report.read_text())


def _run_setting(setting: str, arm_dir: Path, base: dict[str, Any], *, study: StudyPlan,
                 n_train: dict[str, int], n_sites: int, flower: bool) -> SettingResult:
    """Run one arm under ``arm_dir`` (its ``sites/`` already laid out); the row before collecting."""
    if setting == "zero-shot":
        result = SettingResult(setting, "zero-shot (base model)", True, None, None)
        _driver_arm(arm_dir, base | {"num-rounds": 1}, mode="zero-shot", n_sites=n_sites)
    elif setting in ("no-dp", "no-dp-long"):
        probe = setting == "no-dp-long"
        label = (f"NO DP, {PROBE_OVERRIDES['train.steps']} steps/round (memorization probe)" if probe
                 else "NO DP (non-private baseline)")
        result = SettingResult(setting, label, False, None, None)
        report = _driver_arm(arm_dir, base | (PROBE_OVERRIDES if probe else {}), mode="no-dp",
                             n_sites=n_sites)
        if not all(report["wire_refused"].values()):
            raise FedsynthError("the wire contract accepted a non-private update")
        (arm_dir / "NON-PRIVATE-BASELINE.txt").write_text(
            "This arm trained WITHOUT differential privacy (no clipping, no noise, no ledger entry).\n"
            "Its adapters have no privacy guarantee (the wire contract refused every one of them);\n"
            "it exists only as the privacy-utility study's baseline.\n"
        )
    else:
        total = float(setting.removeprefix("eps-"))
        per_site = {
            name: per_round_epsilon(total, n_train=n, batch=int(base["train.expected-batch-size"]),
                                    steps=int(base["train.steps"]), rounds=study.rounds)
            for name, n in n_train.items()
        }
        e = min(v[0] for v in per_site.values())  # every site stays at or under the total
        console.print(f"per-round ε {e:.4f} → whole-run ε per site (PRV): "
                      + ", ".join(f"{k} {v[1]:.3f}" for k, v in per_site.items()))
        result = SettingResult(setting, f"DP ε = {total:g}", True, total, e)
        config = base | {"train.noise-multiplier": 0.0, "train.epsilon-per-round": round(e, 6),
                         "run-name": f"study-{setting}"}
        if flower:
            summary = _federated_arm(arm_dir, config, n_sites=n_sites)
            result.epsilon_achieved = _achieved_epsilon(summary)
        else:
            report = _driver_arm(arm_dir, config, mode="dp", n_sites=n_sites)
            result.epsilon_achieved = {k: float(v["epsilon"]) for k, v in report["privacy"].items()}
        over = {k: v for k, v in result.epsilon_achieved.items() if v > total + 1e-9}
        if over:
            raise FedsynthError(f"{setting}: sites spent more than ε = {total:g}: {over}")
    return result


# ---- the command ---------------------------------------------------------------


def run_study(out: Path, *, reduced: bool = False, seed: int = 0, flower: bool = False) -> list[SettingResult]:
    """Run every setting of :func:`plan` in sequence under ``out``; write study.json/md and PNGs.

    ``flower``: run the DP arms through ``flwr run`` (Flower simulation, the
    deployment's ServerApp/ClientApp; slower: it evaluates after every round)
    instead of the site driver. Zero-shot and no-DP always use the driver.
    """
    study = plan(reduced=reduced, seed=seed)
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"study directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data = out / "data"
    env = _env(out / ".flwr")
    site_cli = str(BIN / "fedsynth-site")
    console.rule("[bold]fictional consortium data (canaries planted 1, 5, 10 times) and embedded model")
    run_command([site_cli, "demo-data", str(data), "--seed", str(seed), "--patients-per-site",
          str(study.patients_per_site), "--canaries", ",".join(map(str, CANARY_REPETITIONS))],
         env=env, what="writing demo data")
    shutil.rmtree(data / "public")  # the public split is not a site
    run_command([site_cli, "build-model"], env=env, what="installing the embedded model")
    site_dirs = sorted(d for d in data.iterdir() if (d / "notes.jsonl").is_file())
    heldout = float(SiteSettings.model_fields["heldout_fraction"].default)
    n_train = {d.name: training_patients(d / "notes.jsonl", heldout_fraction=heldout) for d in site_dirs}
    base = study.run_config | {"num-rounds": study.rounds}

    order = {name: i for i, name in enumerate(DISPLAY_ORDER)}
    results: list[SettingResult] = []
    lock = threading.Lock()

    def run_arm(setting: str) -> None:
        arm_dir = out / setting
        shutil.copytree(data, arm_dir / "sites")
        first = out / study.settings[0] / "sites"
        if setting != study.settings[0]:  # same notes: reuse the first arm's private-note embedding caches
            for cache in first.glob("*/output/cache"):
                shutil.copytree(cache, arm_dir / "sites" / cache.parent.parent.name / "output" / "cache")
        t0 = time.monotonic()
        console.rule(f"[bold]{setting}")
        result = _run_setting(setting, arm_dir, base, study=study, n_train=n_train, n_sites=len(site_dirs),
                              flower=flower)
        result.wall_s = time.monotonic() - t0
        collect(result, arm_dir / "sites")
        with lock:
            results.append(result)
            results.sort(key=lambda r: order.get(r.setting, len(order)))
            console.print(f"{setting}: done in {result.wall_s:.0f} s")
            (out / "study-partial.json").write_text(json.dumps(_json_safe([asdict(r) for r in results]), indent=2))

    # The first arm alone (it builds the embedding caches the others copy), then the rest
    # `workers` at a time: each arm is one single-threaded process, so two arms use both
    # cores. Flower arms stay sequential (each starts its own SuperLink on free ports).
    run_arm(study.settings[0])
    workers = 1 if flower else max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run_arm, name) for name in study.settings[1:]]:
            future.result()  # re-raises the first failure

    record = {
        "command": "python bench/study.py --out DIR" + (" --reduced" if reduced else "")
                   + (" --flower" if flower else ""),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": time.monotonic() - started,
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "python": sys.version.split()[0]},
        "plan": asdict(study),
        "training_patients": n_train,
        "columns": list(COLUMNS),
        "settings": [asdict(r) for r in results],
    }
    (out / "study.json").write_text(json.dumps(_json_safe(record), indent=2))
    console.print(write_outputs(results, out))
    console.print(f"study: {out} ({record['wall_s']:.0f} s)")
    return results


def study_command(
    out: Annotated[Path, typer.Option(help="Study directory (must be new or empty).")],
    reduced: Annotated[bool, typer.Option(help="Tiny CI version: ε = 8 and no DP, 1 round.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data, LoRA init and generation.")] = 0,
    flower: Annotated[bool, typer.Option(help="DP arms through `flwr run` (Flower simulation; slower).")] = False,
) -> None:
    """Privacy–utility study: zero-shot, DP ε = 1, 4, 8 (whole run) and NO DP on the demo consortium."""
    try:
        run_study(out, reduced=reduced, seed=seed, flower=flower)
    except FedsynthError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None


if __name__ == "__main__":
    typer.run(study_command)
