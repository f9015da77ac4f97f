"""``fedsynth-site``: the site's command line, a thin layer over plain functions.

Settings come from ``FEDSYNTH_SITE_*`` environment variables, a ``.env`` file
or a secrets directory; command-line options override them. Expected errors
(bad notes, a refused budget, a bad setting) print one clear message and exit
with the error's code; only bugs show a traceback.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from client.cli_ledger import budget, ledger_app
from client.cli_options import (
    ModelOpt,
    NotesOpt,
    OutOpt,
    cli_settings,
    console,
    err_console,
    progress_bar,
)
from shared.about import version_option
from shared.cli_errors import expected_errors
from shared.cli_keygen import KeyPathArg, OverwriteKeyOpt, create_key_pair
from shared.run_config import RunConfig

app = typer.Typer(
    name="fedsynth-site",
    help="fedsynth site client: notes, demo data, the embedded model, DP-LoRA rounds, budget.",
    epilog="Exit codes: 0 ok; 1 other error (doctor: a check failed); 2 settings/usage; 3 bad input "
    "(notes); 4 model; 5 privacy refusal; 6 budget exceeded; 7 privacy ledger; 8 training; "
    "9 wire contract; 10 verification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: Annotated[bool, version_option("fedsynth-site")] = False,
) -> None:
    """fedsynth site client (exit codes: see the epilog and docs/hospital-it.md)."""


# The run config's defaults (their one definition: shared/run_config.py), for options and --help.
_RUN = RunConfig()


@app.command()
@expected_errors
def validate(
    notes: Annotated[Path, typer.Argument(help="Notes file (JSONL or CSV).")],
    mode: Annotated[str, typer.Option(help="strict: stop on any bad line; skip: skip and count.")] = "strict",
) -> None:
    """Validate a notes file: every bad line with its number and reason, then a summary."""
    from client.notes import load_notes, summarize

    loaded = load_notes(notes, mode=mode)  # type: ignore[arg-type]
    for problem in loaded.problems:
        err_console.print(f"[yellow]skipped[/] {problem}", highlight=False)
    s = summarize(loaded.notes)
    table = Table(title=f"{notes}: {s.notes} notes, {s.patients} patients", show_header=True)
    table.add_column("ICD-10")
    table.add_column("notes", justify="right")
    for code, n in sorted(s.codes.items()):
        table.add_row(code, str(n))
    console.print(table)
    console.print(
        f"words per note: mean {s.length_words_mean:.0f}, median {s.length_words_p50:.0f}, "
        f"max {s.length_words_max}; most notes for one patient: {s.notes_per_patient_max}; "
        f"skipped lines: {loaded.skipped}"
    )


@app.command("demo-data")
@expected_errors
def demo_data(
    out: Annotated[Path, typer.Argument(help="Directory to write the fictional consortium into.")],
    seed: int = 0,
    patients_per_site: int = 120,
    canaries: Annotated[str, typer.Option(help="Canary repetitions, e.g. '1,5,10' ('' = none).")] = "",
) -> None:
    """Write the fictional demo consortium (three hospitals + a public split)."""
    from client.demo.data import write_demo

    reps = tuple(int(x) for x in canaries.split(",") if x.strip())
    manifest = write_demo(out, seed=seed, patients_per_site=patients_per_site, canary_repetitions=reps)
    for site, path in manifest.sites.items():
        console.print(f"{site}: {path}")
    console.print(f"public: {manifest.public}")


@app.command("build-model")
@expected_errors
def build_model(
    rebuild: Annotated[
        bool,
        typer.Option(help="Train it from public text even though fedsynth ships it (~19 min on one core), "
                          "and compare the weights with the shipped BUILD.json."),
    ] = False,
    seed: int = 0,
) -> None:
    """Install (once) the embedded default model into the cache, trained on public text only.

    fedsynth ships the model (client/embedded_model/, see its BUILD.json); it is
    built here only when the recipe or seed differs from the shipped one, or with
    --rebuild (how an auditor reproduces it).
    """
    from client.embedded_artifact import SHIPPED_DIR, read_build
    from client.pretrain import ensure_embedded_model

    with progress_bar() as bar:
        tasks: list = []  # a bar only when it trains (installing the shipped build takes seconds)

        def report(step: int, total: int, loss: float) -> None:
            if not tasks:
                tasks.append(bar.add_task("pretraining embedded model", total=total, info=""))
            bar.update(tasks[0], completed=step, total=total, info=f"loss {loss:.3f}")

        path = ensure_embedded_model(seed=seed, rebuild=rebuild, progress=report)
    build = read_build(path) or {}
    console.print(f"embedded model: {path}")
    console.print(f"steps {build.get('steps')}, final loss {build.get('final_loss')}, "
                  f"weights sha256 {build.get('weights_sha256')}")
    if rebuild:
        shipped = read_build(SHIPPED_DIR) or {}
        if shipped.get("weights_sha256") == build.get("weights_sha256"):
            console.print(f"identical to the shipped weights ({SHIPPED_DIR / 'BUILD.json'})")
        else:
            console.print(f"differs from the shipped weights {shipped.get('weights_sha256')} "
                          f"({SHIPPED_DIR / 'BUILD.json'}): builds are bit-identical for one recipe, seed, "
                          "torch version and CPU; other CPUs or versions round differently, so compare "
                          "corpus_sha256, steps and final_loss too")


@app.command()
@expected_errors
def keygen(path: KeyPathArg, overwrite: OverwriteKeyOpt = False) -> None:
    """Create the site's Ed25519 signing key for its audit log and privacy reports."""
    for line in create_key_pair(path, overwrite=overwrite, env_var="FEDSYNTH_SITE_SIGNING_KEY",
                                public_key_note="give it to auditors out of band"):
        console.print(line)


LoraTargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-targets",
        help="Comma-separated module names LoRA wraps, e.g. q_proj,k_proj,v_proj,o_proj "
        "(default: the model family's attention and MLP projections; required for families without one).",
    ),
]


def parse_lora_targets(value: str | None) -> tuple[str, ...] | None:
    """``--lora-targets`` as a tuple of module-name suffixes (``None``: family default)."""
    if value is None:
        return None
    from shared.errors import ConfigError, Problem

    names = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    bad = [n for n in names if not n.replace("_", "").replace(".", "").isalnum()]
    if not names or bad:
        raise ConfigError(
            "invalid --lora-targets",
            [Problem("--lora-targets", f"not a module name: {n!r}") for n in bad]
            or [Problem("--lora-targets", "no module names given")],
        )
    return names


def train_run_config(
    *,
    steps: int | None = None,
    batch: int | None = None,
    noise_multiplier: float | None = None,
    epsilon_per_round: float | None = None,
    lora_targets: tuple[str, ...] | None = None,
) -> RunConfig:
    """The run config ``fedsynth-site train`` runs: the federation's defaults plus its options.

    Every option left out keeps :class:`~shared.run_config.RunConfig`'s default (the
    values ``[tool.flwr.app.config]`` repeats), so a round run by hand is the
    federation's round. ``--noise-multiplier`` or ``--epsilon-per-round`` picks the
    noise mode and sets the other to 0 (``--noise-multiplier`` wins when both are given).
    Validated like any run config (:class:`~shared.errors.ConfigError`).
    """
    from shared.run_config import with_overrides

    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["train.steps"] = steps
    if batch is not None:
        overrides["train.expected-batch-size"] = batch
    if noise_multiplier is not None:
        overrides |= {"train.noise-multiplier": noise_multiplier, "train.epsilon-per-round": 0.0}
    elif epsilon_per_round is not None:
        overrides |= {"train.noise-multiplier": 0.0, "train.epsilon-per-round": epsilon_per_round}
    if lora_targets is not None:
        overrides["lora.targets"] = ",".join(lora_targets)
    return with_overrides(RunConfig(), overrides)



@app.command()
@expected_errors
def train(
    notes: NotesOpt = None,
    output_dir: OutOpt = None,
    model_dir: ModelOpt = None,
    round_id: Annotated[str, typer.Option(help="Label recorded in the ledger.")] = "local-1",
    steps: Annotated[int | None, typer.Option(
        help=f"DP-SGD steps (train.steps; default {_RUN.train.steps}).")] = None,
    batch: Annotated[int | None, typer.Option(
        help=f"Expected patients per logical batch (train.expected-batch-size; default "
             f"{_RUN.train.expected_batch_size}).")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(
        help=f"Noise multiplier sigma (train.noise-multiplier; default {_RUN.train.noise_multiplier:g}).")] = None,
    epsilon_per_round: Annotated[float | None, typer.Option(
        help="Solve sigma for this round's epsilon instead (train.epsilon-per-round).")] = None,
    lora_targets: LoraTargetsOpt = None,
) -> None:
    """Train one local DP-LoRA round without a coordinator, as the federation's round; print ε spent.

    The round's knobs are the run config's defaults plus these options, tightened to
    this site's floors exactly as a federated round is (:func:`client.policy.floor_run`).
    """
    from client import policy
    from client.site import audit_log, train_local_round

    settings = cli_settings(notes_path=notes, output_dir=output_dir, model_dir=model_dir)
    run = train_run_config(steps=steps, batch=batch, noise_multiplier=noise_multiplier,
                           epsilon_per_round=epsilon_per_round,
                           lora_targets=parse_lora_targets(lora_targets))
    run = policy.floor_run(run, settings, phase="train", round_id=round_id,
                           audit=lambda: audit_log(settings))
    with progress_bar() as bar:
        task = bar.add_task("DP-LoRA steps", total=run.train.steps, info="")

        def report(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

        result = train_local_round(settings, run, round_id=round_id, progress=report)
    p = result.privacy
    console.print(
        f"round {round_id}: ε this round {p.epsilon_round:.3f}, total ε {p.epsilon:.3f} "
        f"of ceiling {settings.epsilon_ceiling:g} (δ={p.delta:.2e}, σ={p.noise_multiplier:.3f}, "
        f"q={p.sample_rate:.4f}, steps={p.steps}, accountant={p.accountant})"
    )


app.command()(budget)  # client/cli_ledger.py: ε spent and left, from the whole ledger


@app.command()
@expected_errors
def generate(
    out: Annotated[Path, typer.Argument(help="JSONL file to write the reports to (stays at the site).")],
    model_dir: ModelOpt = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="LoRA adapter: a PEFT adapter folder, the coordinator's checkpoint folder "
            "(its latest round) or a .safetensors file; none = zero-shot."
        ),
    ] = None,
    codes: Annotated[str, typer.Option(help="Comma-separated ICD-10 codes.")] = "F20,F31,F32,F41.1,F43.1",
    n_per_code: int = _RUN.generate.reports_per_code,
    max_new_tokens: int = _RUN.generate.max_new_tokens,
    temperature: float = _RUN.generate.temperature,
    top_p: float = _RUN.generate.top_p,
    seed: int = _RUN.generate.seed,
) -> None:
    """Generate ICD-10-conditioned reports, zero-shot or with an adapter, with provenance per report."""
    from client.adapter_files import read_adapter
    from client.generation.generate import check_sampling, generate_reports
    from client.generation.reports import write_reports
    from client.model import adapter_hash, add_lora, load_adapter_state, load_model
    from shared import icd10

    code_list = icd10.normalize_all([c for c in codes.split(",") if c.strip()], where="--codes")
    sampling = dataclasses.replace(_RUN.generate, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens, seed=seed)
    check_sampling(sampling)  # before the slow model load
    settings = cli_settings(model_dir=model_dir)  # --model-dir, else FEDSYNTH_SITE_MODEL_DIR
    model_dir = settings.model_dir
    loaded = read_adapter(adapter) if adapter is not None else None  # before the slow model load
    model, tokenizer = load_model(model_dir, device=settings.resolved_device())
    tensors = None
    if loaded is not None:
        tensors = loaded.tensors
        model = add_lora(model, r=loaded.r, alpha=loaded.alpha, targets=list(loaded.targets))
        load_adapter_state(model, tensors)
    with progress_bar() as bar:
        task = bar.add_task("generating", total=len(code_list) * n_per_code, info="")
        reports = generate_reports(
            model, tokenizer, code_list, n_per_code=n_per_code, sampling=sampling,
            setting="adapter" if tensors is not None else "zero-shot",
            model_id=str(model_dir or "embedded"),
            adapter_hash=adapter_hash(tensors) if tensors is not None else None,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    write_reports(reports, out)
    requested = len(code_list) * n_per_code
    failed = f" ({requested - len(reports)} of {requested} failed, see the warning above)"
    console.print(f"{len(reports)} reports -> {out}" + (failed if len(reports) < requested else ""))


@app.command()
@expected_errors
def evaluate(
    reports: Annotated[Path, typer.Argument(help=(
        'Synthetic reports: JSONL from `generate`, or plain JSONL lines {"icd10": "F32.1", "text": "..."} '
        "from any generator; or a notes file with --as-notes."))],
    notes: NotesOpt = None,
    output_dir: OutOpt = None,
    as_notes: Annotated[bool, typer.Option(help="Treat REPORTS as a notes file (e.g. the public split).")] = False,
    k_min: Annotated[int | None, typer.Option(help="Smallest cell that may be summarised.")] = None,
    model_dir: ModelOpt = None,
    adapter: Annotated[Path | None, typer.Option(help=(
        "LoRA adapter (.safetensors) that wrote the reports: adds membership inference and canary "
        "exposure (on --model-dir, default the embedded model)."))] = None,
) -> None:
    """Evaluate reports against this site's private notes: JSON + self-contained HTML report (stays at the site)."""
    from client.evaluate.embeddings import Embedder
    from client.evaluate.release import GateConfig
    from client.evaluate.suite import evaluate_site, load_canaries
    from client.evaluate.write import write_evaluation
    from client.generation.reports import SyntheticReport, read_reports
    from client.notes import load_notes
    from client.site import load_site_data
    from shared.errors import ConfigError, InputError, Problem

    if model_dir is not None and adapter is None:
        raise ConfigError("cannot evaluate", [Problem("--model-dir", "needs --adapter: membership inference "
                                                      "and canary exposure are measured on the adapter")])
    settings = cli_settings(notes_path=notes, output_dir=output_dir, k_min=k_min)
    # The reports are read and checked before any model or note is loaded.
    if as_notes:
        batch = [
            SyntheticReport(report_id=n.note_id, code=n.primary_code, text=n.text, setting="zero-shot",
                            model_id=f"notes:{reports.name}", adapter_hash=None, sampling={}, seed=0)
            for n in load_notes(reports, mode="strict").notes
        ]
    else:
        batch = read_reports(reports)
    if not batch:
        raise InputError(f"nothing to evaluate in {reports}", [Problem(
            str(reports), 'no reports (the file is empty); expected one JSON object per line, e.g. '
            '{"icd10": "F32.1", "text": "..."}')])
    if len(batch) == 1:
        console.print("1 report: Self-BLEU and the mode-collapse ratio compare reports with each other "
                      "and are not computed; every other metric is.")
    model = tokenizer = None
    if adapter is not None:
        from safetensors.torch import load_file

        from client.model import add_lora, load_adapter_state, load_model

        model, tokenizer = load_model(model_dir, device=settings.resolved_device())
        tensors = load_file(str(adapter))
        r = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
        model = add_lora(model, r=r, alpha=2 * r)
        load_adapter_state(model, tensors)
        model.eval()
    data = load_site_data(settings)
    with progress_bar() as bar:
        task = bar.add_task("evaluating (embeddings, metrics)", total=None, info="")
        ev = evaluate_site(
            batch, data.train, data.heldout,
            embedder=Embedder(device=settings.resolved_device()),
            cache_dir=settings.output_dir / "cache", k_min=settings.k_min,
            model=model, tokenizer=tokenizer,
            canaries=load_canaries(settings.notes_path.parent / "canaries.json") if model is not None else (),
            gate=GateConfig(),
        )
        bar.update(task, total=1, completed=1)
    paths = write_evaluation(ev, settings.output_dir / "evaluation" / reports.stem, title=reports.name)
    table = Table(title=f"{len(batch)} reports vs {settings.notes_path} (k_min={settings.k_min})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, cell in sorted(ev.cells.items()):  # site-only values: this command sends nothing
        table.add_row(name, f"{cell.value:.4g}")
    console.print(table)
    if ev.gate is not None:
        console.print(f"release gate: {len(ev.gate.kept)} of {ev.gate.total} kept; removed {ev.gate.removed}; "
                      f"thresholds {ev.gate.thresholds}")
    console.print(f"site-only values (a federated evaluate round sends only the DP-noised summary); "
                  f"report: {paths['html']}")


app.add_typer(ledger_app, name="ledger")  # client/cli_ledger.py: recover, rotate-key


def _register_doctor() -> None:
    from client.doctor.run import doctor_command

    app.command("doctor")(expected_errors(doctor_command))


_register_doctor()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
