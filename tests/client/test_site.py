"""A whole site round by hand (train, then generate + evaluate) on tiny demo data."""

import json
from pathlib import Path

import pytest
import torch

from client import site
from client.demo.data import write_demo
from client.model import tiny_random_model
from shared.audit import verify_log
from shared.errors import BudgetExceededError, PrivacyError
from shared.privacy_scalars import PRIVACY_KEYS, PrivacyScalars
from shared.report import SiteRoundReport
from shared.report_io import read_report, write_schemas
from shared.run_config import RunConfig
from shared.settings import SiteSettings, load_settings
from shared.signing import generate_key, load_public_key
from shared.verify import EXIT_FAILED, EXIT_OK, exit_code, verify_paths
from shared.whitelist import METRIC_NAMES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    manifest = write_demo(root / "data", seed=3, patients_per_site=40, canary_repetitions=(2,))
    model, tokenizer = tiny_random_model("llama", seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root, manifest
    torch.set_num_threads(threads)


def _settings(root: Path, manifest, **kw) -> SiteSettings:
    return load_settings(
        SiteSettings,
        site_id="site-a",
        notes_path=manifest.sites["site-a"],
        output_dir=root / kw.pop("out", "out"),
        model_dir=root / "model",
        k_min=2,
        # secure noise needs torchcsprng, which the test environment does not install
        require_secure_noise=kw.pop("require_secure_noise", False),
        # sigma 1 over 3 steps at q = 1/8 costs epsilon ~2.4 at the default delta: above the
        # default per-round cap (2), which would turn the round into an epsilon-2 one
        max_epsilon_per_round=kw.pop("max_epsilon_per_round", 10.0),
        **kw,
    )


RUN = RunConfig.from_flower({
    "train.steps": 3, "train.expected-batch-size": 4, "train.max-physical-batch-size": 4,
    "train.max-length": 96, "train.noise-multiplier": 1.0, "train.learning-rate": 0.01,
    "generate.reports-per-code": 2, "generate.max-new-tokens": 24, "generate.codes": "F32,F41.1",
    "evaluate.k-min": 2,
})


def test_train_then_evaluate_round(world):
    root, manifest = world
    pub = generate_key(root / "keys" / "site-a.key", overwrite=True)
    settings = _settings(root, manifest, signing_key=root / "keys" / "site-a.key")
    spec = site.adapter_spec(settings, RUN)
    adapter, privacy = site.site_train(settings, RUN, global_adapter=None, round_id=1)
    assert {k: (v.shape, str(v.dtype)) for k, v in adapter.items()} == {
        k: (shape, dtype) for k, (shape, dtype) in spec.items()
    }
    assert set(privacy) == PRIVACY_KEYS and privacy["epsilon"] > 0
    assert privacy["patients_bucket"] % 10 == 0
    # the spend is in the ledger, reserved; released only once the ClientApp's wire check passed
    entries = site.open_ledger(settings).entries()
    assert [e.kind for e in entries] == ["reserve"]
    assert (privacy["ledger_seq"], privacy["ledger_head"]) == (entries[0].seq, entries[0].hash)
    site.release_update(settings, PrivacyScalars.from_record(privacy))  # as the ClientApp, after its check
    assert [e.kind for e in site.open_ledger(settings).entries()] == ["reserve", "released"]
    # the round's adapter is also a PEFT folder naming the base model
    from client.adapter_files import read_adapter

    folder = site.adapter_folder(settings, 1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "model")
    assert read_adapter(folder).tensors.keys() == adapter.keys()

    summary = site.site_evaluate(settings, RUN, global_adapter=adapter, round_id=1)
    assert summary and set(summary) <= METRIC_NAMES
    # the metric release was charged to the same ledger (σ, q = 1, one step), then released
    entries = site.open_ledger(settings).entries()
    assert [e.kind for e in entries] == ["reserve", "released", "reserve", "released"]
    assert entries[2].round_id.startswith("eval-") and (entries[2].sample_rate, entries[2].steps) == (1.0, 1)
    assert entries[2].noise_multiplier == settings.eval_noise_multiplier
    # sampled with a site-drawn seed, not the run's
    seeds = {json.loads(line)["seed"] for line in
             (settings.output_dir / "reports" / "round-1" / "synthetic.jsonl").read_text().splitlines()}
    assert RUN.generate.seed + 1 not in seeds and RUN.generate.seed not in seeds
    assert summary["count.reports"] == 0.0  # 4 reports, rounded down to a multiple of 10
    out = settings.output_dir
    assert (out / "reports" / "round-1" / "synthetic.jsonl").read_text().count("\n") == 4
    html = (out / "evaluation" / "round-1" / "evaluation.html").read_text()
    assert "data:image/png;base64," in html
    # both membership attacks ran: plain loss threshold and calibrated against the base model
    evaluation = json.loads((out / "evaluation" / "round-1" / "evaluation.json").read_text())
    assert {"privacy.mia_auc", "privacy.mia_auc_calibrated"} <= set(evaluation["cells"])
    assert 0.0 <= evaluation["membership"]["auc_calibrated"] <= 1.0
    keys = {"site-a": load_public_key(pub)}
    # every entry signed: each ledger record anchored (train reserve/release, evaluation
    # reserve/release), the train and evaluate rounds, the report
    assert verify_log(out / "audit.jsonl", keys) == 7
    kinds = [json.loads(line)["kind"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert kinds.count("ledger_anchor") == 4 and kinds.count("report_issued") == 1

    # The round's privacy report: schema-valid, signed by site-a, ε = what the update carried.
    path = out / "privacy-reports" / "report-round-1.json"
    report = read_report(path, SiteRoundReport)
    assert report.site_id == "site-a" and report.round == 1
    # ε includes the metric release; metrics are dp-noised and their own ε is stated
    assert report.privacy.epsilon > privacy["epsilon"]
    assert report.privacy.epsilon == pytest.approx(site.open_ledger(settings).epsilon(delta=report.privacy.delta))
    assert report.metrics_mode == "dp-noised" and 0 < report.metrics_epsilon < report.privacy.epsilon
    assert report.privacy.epsilon_round == pytest.approx(privacy["epsilon_round"])
    assert (report.privacy.steps, report.privacy.sample_rate) == (privacy["steps"], privacy["sample_rate"])
    assert report.metrics == pytest.approx(summary)
    assert report.release_gate is not None and report.release_gate.checked == 4
    assert report.canaries is not None and report.canaries.planted >= 1
    import jsonschema  # a dev dependency (pyproject [dev]): missing is a failure, not a skip
    (schema_path,) = [p for p in write_schemas(root / "schemas") if p.name.startswith("site-round")]
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(json.loads(path.read_text()), schema)
    results = verify_paths([out], keys)
    assert exit_code(results) == EXIT_OK, [r.lines() for r in results]
    assert any(r.path == path and r.status == "OK" for r in results)
    path.write_text(path.read_text().replace('"round": 1', '"round": 2'))
    assert exit_code(verify_paths([path], keys)) == EXIT_FAILED


def test_budget_refusal_is_audited_and_trains_nothing(world):
    root, manifest = world
    settings = _settings(root, manifest, out="out-tight", epsilon_ceiling=0.01)
    with pytest.raises(BudgetExceededError, match="ceiling"):
        site.site_train(settings, RUN, global_adapter=None, round_id=1)
    assert site.open_ledger(settings).entries() == []
    assert not (settings.output_dir / "adapters").exists()
    text = (settings.output_dir / "audit.jsonl").read_text()
    assert "budget_refusal" in text


def test_delta_above_one_over_n_is_refused(world):
    root, manifest = world
    settings = _settings(root, manifest, out="out-delta", delta=0.5)
    with pytest.raises(PrivacyError, match=r"1/\(10 \* n_patients\)"):
        site.site_train(settings, RUN, global_adapter=None, round_id=1)
