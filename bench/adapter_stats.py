"""``python bench/adapter_stats.py RUN_DIR...``: what training did to a proxy run's adapters.

For each round adapter a ``bench/proxy.py`` run saved
(``output/adapters/round-K.safetensors``), in ``run`` order:

- the root mean square of the LoRA ``A`` and ``B`` weights, and of the weight
  change they add to the model, ``B·A·α/r`` (one number over every adapted
  matrix);
- with ``--grad-patients N``: the median, 10th and 90th percentile of the
  per-patient gradient norm over the adapter's weights, on ``N`` training
  patients of the run's own (public) notes, at that adapter. DP-SGD clips this
  norm at ``train.max-grad-norm``, so it says how much of the clip bound a
  patient's signal fills.

Why (issue #15, docs/results.md): under DP with AdamW the noise dominates
every coordinate's gradient and AdamW divides it out, so the weights' growth
is set by the learning rate and the number of steps, not by σ; two DP runs
at different σ whose adapters have the same size moved mostly by noise.

Pure reading and one forward/backward per patient on CPU: nothing is
trained, nothing is written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/adapter_stats.py` finds bench/

from bench.curve import load_record  # noqa: E402
from shared.errors import FedsynthError, InputError, Problem  # noqa: E402


def weight_stats(adapter: dict[str, Any], *, alpha: float, r: int) -> dict[str, float]:
    """RMS of the LoRA A weights, B weights and of B·A·α/r over all adapted matrices (numpy arrays)."""
    import numpy as np

    a_names = sorted(k for k in adapter if ".lora_A." in k)
    if not a_names:
        raise InputError("not a LoRA adapter", [Problem("adapter", "no lora_A weights")])
    a = np.concatenate([np.asarray(adapter[k], dtype=np.float64).ravel() for k in a_names])
    b = np.concatenate([np.asarray(adapter[k.replace(".lora_A.", ".lora_B.")], dtype=np.float64).ravel()
                        for k in a_names])
    delta = np.concatenate([
        (np.asarray(adapter[k.replace(".lora_A.", ".lora_B.")], dtype=np.float64)
         @ np.asarray(adapter[k], dtype=np.float64)).ravel() * (alpha / r) for k in a_names])
    rms = lambda x: float(math.sqrt(float(np.mean(x * x))))  # noqa: E731
    return {"rms_A": rms(a), "rms_B": rms(b), "rms_delta_W": rms(delta)}


def grad_norms(model: Any, tokenizer: Any, notes: list[Any], *, max_length: int) -> list[float]:
    """Each patient's (one note each) gradient norm over the model's trainable LoRA weights, as training takes it."""
    import torch

    from client.dp.examples import per_patient_loss
    from client.prompt import training_example

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    model.train()
    out = []
    for note in notes:
        ex = training_example(note.primary_code, note.text, tokenizer, max_length=max_length)
        ids = torch.tensor([ex["input_ids"]])
        loss = per_patient_loss(model(input_ids=ids).logits, torch.tensor([ex["labels"]]))[0]
        grads = torch.autograd.grad(loss, params)
        out.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    return out


def run_stats(run_dir: Path, *, grad_patients: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """One row per round adapter of the proxy run in ``run_dir`` (and round 0, the base, with gradients)."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from client import site
    from shared.run_config import RunConfig, with_overrides
    from shared.settings import SiteSettings

    record = load_record(run_dir)  # the same reading, and the same errors, as bench/curve.py table
    run = with_overrides(RunConfig(), {"num-rounds": max(1, int(record.get("rounds", 1))), "min-sites": 1,
                                       **(record.get("overrides") or {})})
    files = sorted((run_dir / "output" / "adapters").glob("round-*.safetensors"),
                   key=lambda p: int(p.stem.split("-")[1]))
    rows: list[dict[str, Any]] = []
    sample = None
    if grad_patients:
        torch.set_num_threads(1)
        # runs from before proxy.json named its notes used the demo generator's, written into the run
        notes = Path(record.get("notes") or run_dir / "data" / "site-a" / "notes.jsonl")
        settings = SiteSettings(site_id="proxy", notes_path=notes, output_dir=run_dir / "output",
                                device="cpu", epsilon_ceiling=1e6, max_epsilon_per_round=1e6)
        train = site.load_site_data(settings).train
        pick = np.random.default_rng(seed).choice(len(train), min(grad_patients, len(train)), replace=False)
        sample = [train[int(i)] for i in pick]
    for rnd, file in [(0, None), *((int(f.stem.split("-")[1]), f) for f in files)]:
        if file is None and sample is None:
            continue  # the base model has no adapter weights to measure
        row: dict[str, Any] = {"run": run_dir.name, "round": rnd}
        adapter = None
        if file is not None:
            adapter = load_file(str(file))
            row |= weight_stats(adapter, alpha=run.lora.alpha, r=run.lora.r)
        if sample is not None:
            torch.manual_seed(run.lora.init_seed)  # round 0: PEFT's own initialisation, as training starts
            model, tok = site.build_site_model(settings, lora=run.lora, global_adapter=adapter)
            norms = np.array(grad_norms(model, tok, sample, max_length=run.train.max_length))
            row |= {"grad_norm_p10": float(np.percentile(norms, 10)), "grad_norm_median": float(np.median(norms)),
                    "grad_norm_p90": float(np.percentile(norms, 90)), "clip": run.train.max_grad_norm}
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.4f}" if key in row else "—"


def stats_command(
    runs: Annotated[list[Path], typer.Argument(help="Finished bench/proxy.py run directories.")],
    grad_patients: Annotated[int, typer.Option(help="Patients to take gradient norms on (0: weights only).")] = 0,
    seed: Annotated[int, typer.Option(help="Which training patients (a seeded sample).")] = 0,
) -> None:
    """Print each round adapter's weight sizes (and per-patient gradient norms) as a markdown table."""
    try:
        rows = [row for d in runs for row in run_stats(d, grad_patients=grad_patients, seed=seed)]
    except FedsynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    keys = ("rms_A", "rms_B", "rms_delta_W", "grad_norm_p10", "grad_norm_median", "grad_norm_p90")
    typer.echo("| run | round | " + " | ".join(keys) + " |")
    typer.echo("|---|---|" + "---|" * len(keys))
    for row in rows:
        typer.echo(f"| {row['run']} | {row['round']} | " + " | ".join(_cell(row, k) for k in keys) + " |")


if __name__ == "__main__":
    typer.run(stats_command)
