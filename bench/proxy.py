"""``python bench/proxy.py``: try a training recipe on a proxy site from the public population.

Hyperparameters are chosen here, never on a site's notes (issue #15, item 1).
The proxy site is drawn from the public demo generator (:mod:`client.demo`)
with a seed no demo consortium uses (:data:`PROXY_SEED` + ``--seed``), so its
patients, names and notes are not any demo site's; only the generator, which
is public, is shared (``--notes`` takes another public notes file instead,
e.g. another generator's). One site trains for ``--rounds`` rounds with the
functions the ClientApp calls (:func:`client.site.train_local_round`,
aggregated by the coordinator's :func:`server.strategy.aggregate`), DP at a
whole-run ``--epsilon`` or NON-PRIVATE with ``--no-dp``, then reports are
generated and scored for fidelity only (code mentions masked,
:mod:`client.evaluate.masking`): real-note classifier macro-F1, TSTR/TRTR and
the centroid margin. No privacy metric is computed (the proxy is public).

Output: one JSON object on stdout and in ``DIR/proxy.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/proxy.py` finds bench/

PROXY_SEED = 7_000_000  # no demo consortium, study or test uses seeds this large
ROUND_FIELDS = ("real_classifier_f1", "tstr_trtr", "centroid_margin")  # the learning curve, per round


# Real notes the scores are read against: a seeded sample when the site is larger, so the
# classifier behind every score learns from as many notes at any --patients (scores stay
# comparable along the patients axis) and a 6,000-patient proxy does not spend 20 minutes embedding.
MAX_REAL_TRAIN_NOTES = 2000
MAX_REAL_HELDOUT_NOTES = 500


class _RealEmbeddings:
    """The proxy's real notes embedded once (codes masked): every scoring reads the same."""

    def __init__(self, embedder, data, *, seed: int) -> None:
        import random

        from client.evaluate.masking import mask_all

        rng = random.Random(f"fedsynth-proxy:{seed}:real-notes")
        train = data.train if len(data.train) <= MAX_REAL_TRAIN_NOTES else rng.sample(
            list(data.train), MAX_REAL_TRAIN_NOTES)
        heldout = data.heldout if len(data.heldout) <= MAX_REAL_HELDOUT_NOTES else rng.sample(
            list(data.heldout), MAX_REAL_HELDOUT_NOTES)
        self.train = embedder.embed(mask_all([n.text for n in train]))
        self.train_codes = [n.primary_code for n in train]
        self.heldout = embedder.embed(mask_all([n.text for n in heldout]))
        self.heldout_codes = [n.primary_code for n in heldout]


def run_proxy(out: Path, *, patients: int, seed: int, rounds: int, epsilon: float | None,
              overrides: dict[str, str], reports_per_code: int, zero_shot: bool = False,
              score_rounds: bool = False, notes: Path | None = None) -> dict:
    """Train one proxy site and score its reports; ``epsilon`` None is the non-private arm.

    ``zero_shot``: no training at all (the base model's reports, the arms' common reference).
    ``score_rounds``: also score the adapter after every round (a learning curve in
    ``rounds_log``; each costs one generation and scoring, about 20 s here).
    ``notes``: a PUBLIC notes file (the site notes format) to use as the proxy site
    instead of the demo generator's (e.g. notes from another generator; ``patients``
    is then ignored). Never a site's private notes: this command writes reports
    and prints samples of them.
    """
    import numpy as np
    import torch

    from bench.study import per_round_epsilon
    from client import site
    from client.demo.data import write_demo
    from client.evaluate import fidelity
    from client.evaluate.embeddings import Embedder
    from client.evaluate.eval_policy import evaluation_sampling
    from client.evaluate.masking import mask_all
    from client.generation.generate import generate_reports
    from client.model import adapter_hash
    from server.strategy import aggregate
    from shared.run_config import RunConfig, with_overrides
    from shared.settings import SiteSettings

    torch.set_num_threads(1)
    started = time.monotonic()
    if notes is None:
        notes = write_demo(out / "data", seed=PROXY_SEED + seed, patients_per_site=patients).sites["site-a"]
    # The proxy's site policy: its data are public, so its floors are the experiment's knobs.
    settings = SiteSettings(site_id="proxy", notes_path=notes, output_dir=out / "output", device="cpu",
                            epsilon_ceiling=1e6, max_epsilon_per_round=1e6)
    run = with_overrides(RunConfig(), {"num-rounds": rounds, "min-sites": 1, **overrides})
    data = site.load_site_data(settings)  # validated: a bad notes file is named, line and reason
    patients = len({n.patient_id for n in (*data.train, *data.heldout)})
    n_train = len({n.patient_id for n in data.train})
    per_round = None
    if epsilon is not None and not zero_shot:
        per_round, _ = per_round_epsilon(epsilon, n_train=n_train, batch=run.train.expected_batch_size,
                                                steps=run.train.steps, rounds=rounds)
        run = replace(run, train=replace(run.train, noise_multiplier=0.0, epsilon_per_round=round(per_round, 6)))
    else:  # the NON-PRIVATE baseline takes no noise knobs (client.dp.baseline)
        run = replace(run, train=replace(run.train, noise_multiplier=0.0, epsilon_per_round=0.0))
    codes = sorted({n.primary_code for n in (*data.train, *data.heldout)})
    embedder = Embedder()
    real = _RealEmbeddings(embedder, data, seed=seed)

    def score(adapter_now: dict | None) -> dict:
        t0 = time.monotonic()
        torch.manual_seed(run.lora.init_seed)
        model, tokenizer = site.build_site_model(settings, lora=run.lora, global_adapter=adapter_now)
        model.eval()
        reports = generate_reports(model, tokenizer, codes, n_per_code=reports_per_code,
                                   sampling=evaluation_sampling(settings, run.generate),
                                   setting="zero-shot" if adapter_now is None else "adapter", model_id="embedded",
                                   adapter_hash=None if adapter_now is None else adapter_hash(adapter_now), fast=True,
                                   batch_size=None)
        gen_s = time.monotonic() - t0
        synth = [r for r in reports if r.text.strip()]
        s_emb = embedder.embed(mask_all([r.text for r in synth]))
        s_codes = [r.code for r in synth]
        f1 = fidelity.real_classifier_f1(real.train, real.train_codes, s_emb, s_codes, seed=seed)
        tstr = fidelity.tstr_trtr(real.train, real.train_codes, real.heldout, real.heldout_codes, s_emb, s_codes,
                                  seed=seed)
        centroid = fidelity.centroid_similarity(real.train, real.train_codes, s_emb, s_codes)
        return {"reports": len(reports), "empty_reports": len(reports) - len(synth),
                "real_classifier_f1": float(f1.macro_f1), "tstr_trtr": float(tstr.ratio),
                "trtr_f1": float(tstr.trtr_macro_f1), "centroid_margin": float(centroid.margin_mean),
                "generate_s": round(gen_s, 1),
                "sample_report": synth[0].text[:600] if synth else "",
                "mean_tokens": float(np.mean([len(tokenizer(r.text)["input_ids"]) for r in synth])) if synth else 0.0}

    adapter = None
    rounds_log = []
    for rnd in range(1, rounds + 1 if not zero_shot else 1):
        t0 = time.monotonic()

        def progress(step: int, total: int, loss: float, t0: float = t0, rnd: int = rnd) -> None:
            if step % 25 == 0 or step == total:
                print(f"round {rnd} step {step}/{total} loss {loss:.3f} {time.monotonic() - t0:.0f} s",
                      file=sys.stderr, flush=True)

        res = site.train_local_round(settings, run, round_id=rnd, global_adapter=adapter, data=data,
                                     private=epsilon is not None, progress=progress)
        update = {k: v.detach().float().cpu().numpy() for k, v in res.adapter.items()}
        adapter = aggregate([update], weights=[1.0], reference=adapter)
        rounds_log.append({"round": rnd, "train_s": round(time.monotonic() - t0, 1),
                           "sigma": res.privacy.noise_multiplier, "epsilon": res.privacy.epsilon,
                           "mean_loss": res.mean_loss})
        if score_rounds and rnd < rounds:  # the last round is scored below, as the run's result
            fid = score(adapter)
            rounds_log[-1].update({k: fid[k] for k in ROUND_FIELDS})
        print(json.dumps(rounds_log[-1]), file=sys.stderr, flush=True)

    final = score(None if zero_shot else adapter)
    record = {
        "arm": "zero-shot" if zero_shot else ("no-dp" if epsilon is None else f"eps-{epsilon:g}"),
        "notes": str(notes), "patients": patients, "training_patients": n_train, "seed": seed,
        "rounds": 0 if zero_shot else rounds,
        "epsilon_target": epsilon, "epsilon_per_round": per_round, "overrides": overrides,
        "real_notes_scored": {"train": len(real.train_codes), "heldout": len(real.heldout_codes)},
        "rounds_log": rounds_log, **final, "wall_s": round(time.monotonic() - started, 1),
        "chance_f1": 1.0 / max(len(codes), 1),
    }
    if rounds_log and not zero_shot:
        rounds_log[-1].update({k: final[k] for k in ROUND_FIELDS})
    (out / "proxy.json").write_text(json.dumps(record, indent=2))
    return record


def _scalar(text: str) -> object:
    try:
        return json.loads(text)  # numbers and booleans as Flower's run config types them
    except json.JSONDecodeError:
        return text


def proxy_command(
    out: Annotated[Path, typer.Option(help="Run directory (must be new or empty).")],
    patients: Annotated[int, typer.Option(help="Patients at the proxy site (80% train).")] = 1000,
    epsilon: Annotated[float, typer.Option(help="Whole-run ε at the proxy (PRV, site default δ).")] = 8.0,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="NON-PRIVATE arm: no clipping, no noise.")] = False,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="No training: the base model's reports.")] = False,
    rounds: Annotated[int, typer.Option(help="Rounds (one site: FedAvg keeps its update).")] = 3,
    seed: Annotated[int, typer.Option(help="Proxy population and scoring seed.")] = 0,
    reports_per_code: Annotated[int, typer.Option(help="Reports generated per code.")] = 8,
    score_rounds: Annotated[bool, typer.Option("--score-rounds", help="Score after every round too.")] = False,
    notes: Annotated[Path | None, typer.Option(help="A PUBLIC notes file as the proxy site, instead of the "
                                                    "demo generator's (--patients is then ignored).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Run-config override KEY=VALUE (repeatable).")] = [],  # noqa: B006
) -> None:
    """Train and score one proxy site: the recipe's fidelity, before any site spends ε."""
    from shared.errors import FedsynthError
    from shared.run_config import RunConfig, with_overrides

    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise typer.BadParameter(f"{out} exists and is not empty", param_hint="--out")
    if notes is not None and not notes.is_file():
        raise typer.BadParameter(f"{notes}: no such notes file", param_hint="--notes")
    bad = [kv for kv in set_ if "=" not in kv]
    if bad:
        raise typer.BadParameter(f"expected KEY=VALUE, got {', '.join(map(repr, bad))}", param_hint="--set")
    overrides = {k: _scalar(v) for k, v in (kv.split("=", 1) for kv in set_)}
    try:
        with_overrides(RunConfig(), {"num-rounds": rounds, "min-sites": 1, **overrides})  # all problems, before any work
        out.mkdir(parents=True, exist_ok=True)
        record = run_proxy(out, patients=patients, seed=seed, rounds=rounds,
                           epsilon=None if no_dp or zero_shot else epsilon, overrides=overrides,
                           reports_per_code=reports_per_code, zero_shot=zero_shot,
                           score_rounds=score_rounds, notes=None if notes is None else notes.resolve())
    except FedsynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    print(json.dumps({k: v for k, v in record.items() if k != "sample_report"}, indent=2))


if __name__ == "__main__":
    typer.run(proxy_command)
