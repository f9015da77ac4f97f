"""TEST-ONLY sample reports and the helpers an auditor's bundle (tests/shared/conftest.py) is built and checked with."""

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from shared.audit import AuditLog
from shared.report import SiteRoundReport
from shared.report_consortium import ConsortiumReport
from shared.report_io import software_versions, write_report
from shared.verify import main

HASH = "ab" * 32


def site_report(site_id="site-a", round_=2, **overrides) -> SiteRoundReport:
    data = {
        "site_id": site_id,
        "run_id": "run-1",
        "round": round_,
        "created": datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        "privacy": {
            "epsilon": 2.5, "epsilon_round": 0.9, "delta": 1e-5, "epsilon_ceiling": 8.0,
            "epsilon_remaining": 5.5, "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 300,
            "max_grad_norm": 1.0, "accountant": "prv", "secure_mode": True,
        },
        "metrics": {"dp.train.centroid_cosine_mean": 0.71, "diversity.distinct_2": 0.43,
                    "dp.train.verbatim_13_rate": 0.0, "dp.train.loss_drop_mean": 0.52, "count.reports": 200.0},
        "metrics_mode": "suppressed-aggregates",
        "release_gate": {"checked": 200, "kept": 190, "removed": {"verbatim": 6, "phi_echo": 4}},
        "membership": {"auc": 0.52, "tpr_at_1fpr": 0.012},
        "canaries": None,
        "software": software_versions().model_dump(),
        "model": {"id": "embedded-tiny", "family": "llama", "identity_hash": HASH},
        "config_hash": HASH,
        "history": [
            {"round": 0, "epsilon": 1.0, "metrics": {"dp.train.centroid_cosine_mean": 0.6, "dp.train.loss_drop_mean": 0.5}},
            {"round": 1, "epsilon": 1.8, "metrics": {"dp.train.centroid_cosine_mean": 0.66}},
        ],
    }
    data.update(overrides)
    return SiteRoundReport.model_validate(data)


def consortium_report(**overrides) -> ConsortiumReport:
    def rounds(scale):
        return [
            {"round": r, "epsilon": scale * (r + 1), "epsilon_round": scale, "delta": 1e-5,
             "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0,
             "accountant": "rdp", "secure_mode": False}
            for r in range(3)
        ]

    data = {
        "run_id": "run-1",
        "rounds": 3,
        "created": datetime(2025, 3, 1, tzinfo=UTC),
        "sites": [
            {"site_id": "site-a", "epsilon_ceiling": 8.0, "rounds": rounds(0.8)},
            {"site_id": "site-b", "rounds": rounds(1.1)},
        ],
        "metrics": [{"round": r, "metrics": {"diversity.distinct_2": 0.4 + r / 100}} for r in range(3)],
        "aggregation": {"method": "fedavg", "weighting": "num_examples", "norm_bound": 5.0,
                        "secure_aggregation": False},
        "checkpoints": [{"round": 2, "path": "checkpoints/round-2", "sha256": HASH}],
        "software": software_versions().model_dump(),
        "config_hash": HASH,
    }
    data.update(overrides)
    return ConsortiumReport.model_validate(data)


NAMES = ("site-a", "site-b", "coordinator")


def issue_report(log: AuditLog, report, path: Path, key) -> None:
    """What client/privacy_report.py and server/report.py do: position, write+sign, report_issued."""
    seq, head = log.head()
    report = report.model_copy(update={"audit_seq": seq, "audit_head": head})
    write_report(report, path, key=key)
    data = {"report": path.relative_to(log.path.parent).as_posix(),
            "report_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if hasattr(report, "site_id"):
        data["round"] = report.round
    log.append("report_issued", data)


def key_args(bundle, names=NAMES):
    args = []
    for n in names:
        args += ["--key", f"{n}={bundle['keys'] / (n + '.key.pub')}"]
    return args


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
