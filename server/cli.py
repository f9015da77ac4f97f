"""``fedsynth-coordinator``: the coordinator's command line.

``demo`` runs the demo consortium end to end on this machine: it asks the site
client (``fedsynth-site``, a separate program — the coordinator never imports
site code) to write the fictional data and install the embedded model, then runs
the federation with Flower's simulation engine through ``flwr run``, exactly
the ServerApp/ClientApp a deployment uses. Every site and the coordinator get
their own Ed25519 key, so audit logs and privacy reports are signed; the demo
ends by running the auditor's ``fedsynth-verify`` over the whole run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.simulation import BIN, config_arg, run_command, run_simulation
from shared.about import version_option
from shared.cli_errors import expected_errors
from shared.cli_keygen import KeyPathArg, OverwriteKeyOpt, create_key_pair
from shared.errors import ConfigError, FedsynthError, RunFailedError
from shared.run_config import RunConfig, with_overrides
from shared.signing import generate_key, public_key_path

app = typer.Typer(
    name="fedsynth-coordinator",
    help="fedsynth coordinator: run the demo consortium, start and follow runs, certificates, keys.",
    epilog="Exit codes: 0 ok; 1 other error; 2 settings/usage; 3 bad input; 10 verification failed; "
    "11 the run failed (no site's update was aggregated, or too few sites).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _root(
    version: Annotated[bool, version_option("fedsynth-coordinator")] = False,
) -> None:
    """fedsynth coordinator (exit codes: see the epilog and docs/hospital-it.md)."""

# The demo's run config: the run config's defaults (shared/run_config.py; pyproject.toml repeats
# them) with these explicit overrides only. Why: `make demo` must finish in minutes on a 2-core
# laptop, on three demo sites of 120 patients (about 96 training patients each).
_RUN = RunConfig()  # the run config's defaults, for option defaults
DEMO_OVERRIDES: dict[str, bool | int | float | str] = {
    "min-sites": 3,  # all three demo sites take part in every round
    "timeout.wait-sites": 180,  # the simulation starts its sites within seconds
    "train.steps": 8,  # default 100: 3 rounds of 100 steps take far too long on 2 cores
    # default 64 needs 128 training patients (q <= 1/2); the demo sites have ~96
    "train.expected-batch-size": 16,
    "train.max-physical-batch-size": 16,  # one physical batch per step: faster on CPU
    "train.max-length": 320,  # default 448: shorter windows, faster steps
    "train.learning-rate": 0.003,  # default 5e-3; the demo's own value, kept as it was
    "train.noise-multiplier": 0.0,  # noise by a per-round ε target instead of a fixed σ
    "train.epsilon-per-round": 1.0,
    "lora.r": 8,  # default 16: half the adapter, half the per-step cost
    "lora.alpha": 16.0,  # default 32: the recipe's scale alpha/r = 2 at r 8
    "generate.reports-per-code": 2,  # default 20: evaluation dominates each round's time
    "generate.max-new-tokens": 128,  # default 256
}
DEMO_RUN = with_overrides(RunConfig(), DEMO_OVERRIDES)
"""The demo's whole run config, validated at import. Flower merges :data:`DEMO_OVERRIDES` into
``[tool.flwr.app.config]``, which equals ``RunConfig()``'s defaults, so the run gets exactly this."""


def _print_summary(summary: dict) -> None:
    table = Table(title="demo consortium: rounds")
    for col in ("round", "sites trained", "declined", "ε (max over sites)", "centroid cos (DP)",
                "distinct-2", "verbatim-13 train (DP)", "verbatim-13 held-out (DP)"):
        table.add_column(col)
    for rnd in summary.get("rounds", []):
        train = rnd.get("train", {})
        mean = rnd.get("evaluate", {}).get("mean", {}) or {}
        privacy = rnd.get("privacy") or {}
        eps = [float(p.get("epsilon", 0.0)) for p in privacy.values()]

        def g(name: str, mean: dict = mean) -> str:
            return f"{mean[name]:.3f}" if name in mean else "—"

        table.add_row(
            str(rnd.get("round")), str(len(train.get("accepted", []))),
            str(len(train.get("declined", []))), f"{max(eps):.3f}" if eps else "—",
            g("dp.train.centroid_cosine_mean"), g("diversity.distinct_2"),
            g("dp.train.verbatim_13_rate"), g("dp.heldout.verbatim_13_rate"),
        )
    console.print(table)


@app.command()
@expected_errors
def demo(
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/demo-<time>).")] = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _RUN.num_rounds,
    seed: int = 0,
) -> None:
    """Run the demo consortium: three fictional hospitals, DP-LoRA, generation and evaluation each round."""
    _demo(out, rounds, seed)


@app.command()
@expected_errors
def keygen(path: KeyPathArg, overwrite: OverwriteKeyOpt = False) -> None:
    """Create the coordinator's Ed25519 key for its audit log and consortium report."""
    for line in create_key_pair(path, overwrite=overwrite, env_var="FEDSYNTH_COORD_SIGNING_KEY",
                                public_key_note="give it to auditors, named coordinator.key.pub"):
        console.print(line, highlight=False)


def _demo(out: Path | None, rounds: int, seed: int) -> None:
    if rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (out or Path("runs") / f"demo-{stamp}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not empty")
    sites_dir, coord_dir, home = run_dir / "sites", run_dir / "coordinator", run_dir / ".flwr"
    for d in (sites_dir, coord_dir, home):
        d.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # keep the demo's console to progress and results
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning",
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    site_cli = str(BIN / "fedsynth-site")
    console.rule("[bold]1/3 fictional consortium data")
    run_command([site_cli, "demo-data", str(sites_dir), "--seed", str(seed)],  # canaries: see `study`
         env=env, what="writing demo data")
    shutil.move(str(sites_dir / "public"), str(run_dir / "public"))  # not a site
    keys_dir = _demo_keys(run_dir, sites_dir, coord_dir, env=env)
    console.rule("[bold]2/3 embedded model (shipped, installed into the cache once)")
    run_command([site_cli, "build-model"], env=env, what="installing the embedded model")

    console.rule(f"[bold]3/3 federation: {rounds} rounds × 3 sites (Flower simulation)")
    sim_env = env | {
        "FEDSYNTH_SIM_ROOT": str(sites_dir),
        "FEDSYNTH_COORD_RUN_DIR": str(coord_dir),
        "FEDSYNTH_COORD_SIGNING_KEY": str(coord_dir / "coordinator.key"),
        "OMP_NUM_THREADS": "1",
    }
    sim_env.pop("FEDSYNTH_SITE_SIGNING_KEY", None)  # each simulated site signs with its own key
    config = DEMO_OVERRIDES | {"num-rounds": rounds, "run-name": "demo"}
    log_path = run_dir / "superlink.log"
    run_simulation(work_dir=run_dir, federation="demo", n_sites=3, run_config=config, env=sim_env,
                   superlink_log=log_path)
    summary_path = coord_dir / "demo" / "consortium-summary.json"
    if not summary_path.exists():
        raise FedsynthError(f"the run wrote no consortium summary; see {log_path}")
    summary = json.loads(summary_path.read_text())
    _print_summary(summary)
    console.print(f"run directory: {run_dir}")
    console.print(f"  coordinator: {coord_dir / 'demo'} (global adapter per round, consortium summary, "
                  "signed consortium report, audit log)")
    for site in sorted(p.name for p in sites_dir.iterdir() if p.is_dir()):
        console.print(f"  {site}: {sites_dir / site / 'output'} (ledger, reports, evaluations, "
                      "signed privacy reports, audit log)")
    console.print(f"  public keys: {keys_dir}")
    check_status(summary, summary_path)
    _verifyrun_command(run_dir, keys_dir, env=env)


def check_status(summary: dict, path: Path) -> None:
    """Raise RunFailedError (exit 11) unless the run's status is ``completed``."""
    status = str(summary.get("status", "missing"))
    if status != "completed":
        raise RunFailedError(f"the run did not complete: {status} (summary: {path})")


@app.command("run")
@expected_errors
def run_cmd(
    app_dir: Annotated[Path, typer.Argument(help="The pinned fedsynth tree to submit (as `flwr run`).")],
    federation: Annotated[str, typer.Argument(help="Federation name in the app's pyproject.toml.")],
    run_name: Annotated[str, typer.Option(help="run-name (results in FEDSYNTH_COORD_RUN_DIR/<run-name>/).")],
    run_config: Annotated[str, typer.Option(help='More run config, e.g. "num-rounds=3 secagg=true".')] = "",
    run_dir: Annotated[Path | None, typer.Option(
        envvar="FEDSYNTH_COORD_RUN_DIR", help="The ServerApp's FEDSYNTH_COORD_RUN_DIR.")] = None,
) -> None:
    """Start a run with `flwr run --stream`, follow it, and exit by its outcome.

    `flwr run` only reports that the run was submitted; this command then reads
    the run's consortium summary and exits 11 when the run failed (no site's
    update was aggregated, or too few sites connected), 0 when it completed.
    Run it on the coordinator host, where FEDSYNTH_COORD_RUN_DIR is.
    """
    _run(app_dir, federation, run_name, run_config, run_dir)


def _run(app_dir: Path, federation: str, run_name: str, extra: str, run_dir: Path | None) -> None:
    if run_dir is None:
        raise ConfigError("set FEDSYNTH_COORD_RUN_DIR (or --run-dir) to the ServerApp's run directory")
    if "run-name" in extra:
        raise ConfigError("give the run name with --run-name, not in --run-config")
    summary_path = run_dir / run_name / "consortium-summary.json"
    started = datetime.now(UTC).timestamp()
    config = " ".join(x for x in (extra.strip(), config_arg({"run-name": run_name})) if x)
    cmd = [str(BIN / "flwr"), "run", str(app_dir), federation, "--stream", "--run-config", config]
    console.print(" ".join(cmd), highlight=False, markup=False)
    run_command(cmd, env=dict(os.environ), what="flwr run")
    if not summary_path.is_file() or summary_path.stat().st_mtime < started:
        raise FedsynthError(f"the run wrote no consortium summary at {summary_path} (is this the "
                            "coordinator host, with the ServerApp's FEDSYNTH_COORD_RUN_DIR?)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    _print_summary(summary)
    check_status(summary, summary_path)
    console.print(f"run {run_name}: completed; results in {summary_path.parent}", highlight=False)


@app.command()
@expected_errors
def plan(
    patients: Annotated[int, typer.Option(help="Patients one site trains on (after the held-out split); "
                                               "typed by you, never read from a site.")],
    epsilon: Annotated[float, typer.Option(help="Whole-run ε target per site (patient-level).")],
    rounds: Annotated[int, typer.Option(help="Federated rounds.")],
    batch: Annotated[int, typer.Option(help="Expected batch size B (train.expected-batch-size).")],
    steps: Annotated[int, typer.Option(help="DP-SGD steps per round (train.steps).")] = _RUN.train.steps,
    delta: Annotated[float | None, typer.Option(
        help="δ; default: the site default min(1e-5, 1/(10·b·ln b)) of the patients bucket b.")] = None,
    accountant: Annotated[str, typer.Option(help="prv or rdp (train.accountant).")] = _RUN.train.accountant,
    adapter_params: Annotated[int | None, typer.Option(
        help=f"Trainable adapter parameters d; default: the embedded model's LoRA at the run "
             f"default r={_RUN.lora.r}.")] = None,
    eval_noise_multiplier: Annotated[float, typer.Option(
        help="σ of each evaluation release (the site setting; default 5).")] = 5.0,
    evaluations_per_round: Annotated[int, typer.Option(
        help="Evaluation releases charged per round (0: none).")] = 1,
) -> None:
    """Before committing budget: σ, ε per round and in total, noise-to-signal, measured fidelity."""
    import warnings

    from shared.planning import embedded_adapter_params, plan_lines, plan_run

    with warnings.catch_warnings():  # Opacus/transformers numerical chatter, not the user's problem
        warnings.simplefilter("ignore")
        d = embedded_adapter_params() if adapter_params is None else adapter_params
        result = plan_run(patients=patients, epsilon=epsilon, rounds=rounds, batch=batch, steps=steps,
                          delta=delta, accountant=accountant, adapter_params=d,
                          eval_noise_multiplier=eval_noise_multiplier,
                          evaluations_per_round=evaluations_per_round)
    for line in plan_lines(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
@expected_errors
def pki(
    out_dir: Annotated[Path, typer.Argument(help="Directory for ca.crt/ca.key, server.pem/key, site keys.")],
    sites: Annotated[list[str], typer.Argument(help="Site names (one SuperNode key pair each).")],
    host: Annotated[list[str] | None, typer.Option(
        help="SuperLink host name or IP for the certificate (repeatable; default 127.0.0.1).")] = None,
    days: Annotated[int, typer.Option(help="Server certificate validity in days.")] = 365,
) -> None:
    """Write the consortium CA, the SuperLink TLS certificate and SuperNode key pairs (server.pki)."""
    from server.pki import make_consortium_pki

    paths = make_consortium_pki(out_dir, sites=sites, hosts=host or ["127.0.0.1"], days=days)
    for name, path in paths.items():
        console.print(f"{name}: {path}", highlight=False)
    console.print("ca.key stays offline with the coordinator; each site gets ca.crt and its own key",
                  highlight=False)


def _demo_keys(run_dir: Path, sites_dir: Path, coord_dir: Path, *, env: dict[str, str]) -> Path:
    """One Ed25519 key per site (made by the site's own CLI) and one for the coordinator.

    Private keys stay beside their owner (``sites/<id>/signing.key``,
    ``coordinator/coordinator.key``); the public halves are collected, named after
    whose they are, in ``<run>/keys/`` — what an auditor would receive out of band.
    """
    keys_dir = run_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    for site in sorted(d for d in sites_dir.iterdir() if (d / "notes.jsonl").is_file()):
        run_command([str(BIN / "fedsynth-site"), "keygen", str(site / "signing.key")], env=env,
             what=f"creating the signing key of {site.name}")
        shutil.copyfile(public_key_path(site / "signing.key"), keys_dir / f"{site.name}.key.pub")
    pub = generate_key(coord_dir / "coordinator.key")
    shutil.copyfile(pub, keys_dir / "coordinator.key.pub")
    return keys_dir


def _verifyrun_command(run_dir: Path, keys_dir: Path, *, env: dict[str, str]) -> None:
    """Run the auditor's command over the whole run directory; fail the demo unless it passes."""
    cmd = [str(BIN / "fedsynth-verify"), str(run_dir), "--keys-dir", str(keys_dir)]
    console.rule("[bold]verification (what an auditor runs)")
    console.print(" ".join(cmd), highlight=False)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    console.print(proc.stdout.rstrip(), highlight=False, markup=False, soft_wrap=True)
    if proc.stderr.strip():
        err.print(proc.stderr.rstrip(), highlight=False, markup=False)
    if proc.returncode != 0:
        raise FedsynthError(f"fedsynth-verify failed (exit {proc.returncode}) on {run_dir}")
    console.print("[bold green]verified:[/] every signature, audit log and privacy report in the run checks out")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
