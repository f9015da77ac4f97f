"""The real deployment scripts with the real site code, one SecAgg+ round over gRPC + TLS (e2e).

Everything an operator runs, nothing test-only: certificates from ``python -m
server.pki``, the pin from ``python -m client.launcher pin``, the coordinator
from ``deploy/coordinator.sh`` and two sites from ``deploy/site.sh`` (the
scripts the systemd units and compose files call), each with the variables of
``deploy/*.env.example`` pointed at a temporary tree on 127.0.0.1. The sites run
``client/site.py`` (DP-SGD training, generation, evaluation) on a tiny saved
random llama and the fictional demo notes. Checks: the round completes with
both masked updates aggregated and a checkpoint written; each site wrote its
signed audit log and privacy report; and no 8-word window of either site's
notes appears in any coordinator-side byte (SuperLink database incl. -wal/-shm,
FLWR_HOME, logs, run dir: checkpoints, summary, consortium report, audit log,
the ``flwr run`` output). Run with ``pytest -m e2e tests/e2e/test_deploy_scripts.py``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.demo.data import write_demo
from client.model import tiny_random_model
from shared.audit import verify_log
from shared.signing import generate_key, load_public_key
from tests.e2e import harness

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
PY = sys.executable
SITES = ("site-a", "site-b")
ACTIVE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")

pytestmark = pytest.mark.e2e

# Small enough for 2 busy CPU cores; every key is declared in pyproject's [tool.flwr.app.config].
RUN_CONFIG = (
    "num-rounds=1 min-sites=2 secagg=true timeout.wait-sites=120 timeout.train=300 "
    "timeout.evaluate=300 train.steps=2 train.expected-batch-size=4 "
    "train.max-physical-batch-size=4 train.max-length=96 train.learning-rate=0.01 "
    "generate.codes='F32,F41.1' generate.reports-per-code=2 generate.max-new-tokens=24 "
    "evaluate.k-min=2"
)


def env_from_example(name: str, values: dict[str, str]) -> dict[str, str]:
    """``deploy/<name>.env.example`` with every active variable given a test value.

    Fails when the example gains a variable this test does not set, so the test
    keeps starting the scripts the way an operator's env file would.
    """
    active = {m.group(1) for line in (DEPLOY / f"{name}.env.example").read_text().splitlines()
              if (m := ACTIVE.match(line))}
    assert active - set(values) == set(), f"{name}.env.example sets variables this test does not"
    return {k: str(v) for k, v in values.items()}


def build_install(dst: Path) -> Path:
    """The agreed release as a site installs it (and the coordinator submits it): real code."""
    dst.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", dst)
    for pkg in ("shared", "server", "client"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_deploy_scripts_real_site_secagg_round(tmp_path):
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = harness.Procs(logs)
    base_env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                             "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base_env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    for key in [k for k in base_env if k.startswith(("FEDSYNTH_", "FLWR_"))]:
        base_env.pop(key)

    def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-2000:])
        return out

    # Coordinator, once: certificates and keys with the certificates command.
    pki = tmp_path / "coordinator" / "pki"
    run([PY, "-m", "server.pki", str(pki), *SITES], ROOT, base_env)
    assert {p.name for p in pki.iterdir()} >= {"ca.crt", "server.pem", "server.key", *SITES}

    # Each site: install the agreed release and pin it.
    install = build_install(tmp_path / "opt-fedsynth")
    pin = tmp_path / "pin.json"
    run([PY, "-m", "client.launcher", "pin", str(install), "--out", str(pin)], install, base_env)

    # Site data: fictional demo notes, a tiny saved model, a signing key per site.
    demo = write_demo(tmp_path / "demo", seed=5, patients_per_site=40)
    model_dir = tmp_path / "model"
    model, tokenizer = tiny_random_model("llama", seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    fleet, control = harness.free_port(), harness.free_port()
    coord = tmp_path / "coordinator"
    coord_home = coord / "flwr"
    coord_home.mkdir()
    (coord_home / "config.toml").write_text(
        '[superlink]\ndefault = "hosp"\n\n[superlink.hosp]\n'
        f'address = "127.0.0.1:{control}"\nroot-certificates = "{pki / "ca.crt"}"\n')
    coord_env = base_env | env_from_example("coordinator", {
        "FEDSYNTH_PKI": pki, "FEDSYNTH_STATE_DB": coord / "state.db",
        "FEDSYNTH_FLEET_ADDRESS": f"127.0.0.1:{fleet}", "FEDSYNTH_CONTROL_PORT": control,
        "FLWR_HOME": coord_home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FEDSYNTH_COORD_RUN_DIR": coord / "runs",
        # the sites' base model: the coordinator derives the adapter spec from its config.json
        "FEDSYNTH_COORD_BASE_MODEL_CONFIG": model_dir / "config.json"})

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=coord_env, cwd=coord,
                              capture_output=True, text=True, timeout=timeout)

    def online() -> list[int] | None:
        out = flwr("supernode", "ls", "hosp", "--format", "json")
        try:
            nodes = json.loads(out.stdout)["nodes"]
        except (ValueError, KeyError):
            return None
        up = sorted(int(n["node-id"]) for n in nodes if n.get("status") == "online")
        return up if len(up) >= 2 else None

    data_dirs: dict[str, Path] = {}
    site_keys = {}
    run_out = ""
    try:
        procs.start("coordinator", ["bash", str(DEPLOY / "coordinator.sh")], coord_env, coord)
        harness.wait_for(lambda: flwr("supernode", "ls", "hosp").returncode == 0, 90,
                            "the SuperLink's Control API", step=2)
        registered = []
        for site in SITES:
            out = flwr("supernode", "register", str(pki / f"{site}.pub"), "hosp", "--name", site)
            assert out.returncode == 0, out.stdout + out.stderr
            registered.append(int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1)))

        for site in SITES:
            srv = tmp_path / site  # the site's /srv/site
            data = srv / "data"
            data.mkdir(parents=True)
            shutil.copy(demo.sites[site], data / "notes.jsonl")
            (srv / "pki").mkdir()
            shutil.copy(pki / "ca.crt", srv / "pki" / "ca.crt")
            shutil.copy(pki / site, srv / "pki" / site)  # keeps 0600
            secret = srv / "pki" / "superexec.secret"  # SuperNode <-> launcher (Runtime API auth)
            secret.write_bytes(os.urandom(32))
            secret.chmod(0o600)
            site_keys[site] = load_public_key(generate_key(srv / "keys" / "signing"))
            env = base_env | env_from_example("site", {
                "FEDSYNTH_SUPERLINK": f"127.0.0.1:{fleet}", "FEDSYNTH_CA_CERT": srv / "pki" / "ca.crt",
                "FEDSYNTH_DEPLOY_KEY": srv / "pki" / site, "FEDSYNTH_DEPLOY_SITE_ID": site,
                "FEDSYNTH_DATA_DIR": data, "FEDSYNTH_PIN": pin, "FEDSYNTH_INSTALL_DIR": install,
                "FEDSYNTH_PYTHON": PY, "FEDSYNTH_RUNTIME_PORT": harness.free_port(),
                "FEDSYNTH_SUPEREXEC_SECRET": secret,
                "FEDSYNTH_AUDIT_LOG": data / "audit.jsonl", "FLWR_HOME": srv / "flwr",
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FEDSYNTH_CACHE_DIR": srv / "cache",
                "FEDSYNTH_SITE_SITE_ID": site, "FEDSYNTH_SITE_NOTES_PATH": data / "notes.jsonl",
                "FEDSYNTH_SITE_NOTES_MODE": "strict", "FEDSYNTH_SITE_MODEL_DIR": model_dir,
                "FEDSYNTH_SITE_OUTPUT_DIR": data / "output",
                "FEDSYNTH_SITE_LEDGER_PATH": data / "output" / "privacy-ledger.jsonl",
                "FEDSYNTH_SITE_DEVICE": "cpu", "FEDSYNTH_SITE_EPSILON_CEILING": "8.0",
                "FEDSYNTH_SITE_REQUIRE_SECAGG": "true",
                "FEDSYNTH_SITE_HELDOUT_FRACTION": "0.2", "FEDSYNTH_SITE_SPLIT_SEED": "0",
                "FEDSYNTH_SITE_SIGNING_KEY": srv / "keys" / "signing", "FEDSYNTH_SITE_K_MIN": "2",
                "FEDSYNTH_SITE_LEDGER_KEY": srv / "keys" / "ledger.key",
                # evaluation is a DP release charged to the ledger
                "FEDSYNTH_SITE_EVAL_NOISE_MULTIPLIER": "5.0", "FEDSYNTH_SITE_MAX_EVALUATIONS_PER_RUN": "10",
                # site floors: a two-site test consortium (a SecAgg+ group of 2)
                "FEDSYNTH_SITE_REQUIRE_SECURE_NOISE": "true", "FEDSYNTH_SITE_MIN_NOISE_MULTIPLIER": "0.5",
                "FEDSYNTH_SITE_MIN_EVAL_TOP_P": "0.9", "FEDSYNTH_SITE_MIN_EVAL_TOP_K": "50",
                "FEDSYNTH_SITE_MAX_EPSILON_PER_ROUND": "2.0", "FEDSYNTH_SITE_MIN_EVAL_TEMPERATURE": "0.7",
                "FEDSYNTH_SITE_MIN_SECAGG_THRESHOLD": "0.6", "FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE": "2",
                "FEDSYNTH_SITE_MIN_SITES": "2"})
            procs.start(site, ["bash", str(DEPLOY / "site.sh")], env, srv)
            data_dirs[site] = data
        node_ids = harness.wait_for(online, 120, "two SuperNodes online", step=2)
        assert node_ids == sorted(registered)
        timings["start_to_online_s"] = time.monotonic() - t0

        t = time.monotonic()
        out = flwr("run", str(install), "hosp", "--stream", "--run-config", RUN_CONFIG, timeout=600)
        run_out = out.stdout + out.stderr
        (logs / "flwr-run.log").write_text(run_out)
        timings["secagg_round_s"] = time.monotonic() - t
        summary_path = coord / "runs" / "fedsynth" / "consortium-summary.json"
        assert summary_path.exists(), (run_out[-3000:], procs.log("site-a")[-3000:])
        summary = json.loads(summary_path.read_text())
        rnd = summary["rounds"][0]
        assert summary["status"] == "completed" and summary["secagg"] is True, summary
        assert rnd["train"]["accepted"] == node_ids, (rnd, procs.log("site-a")[-4000:])
        assert rnd["aggregated"] is True and len(rnd["weights"]) == 2, rnd
        assert all(w > 0 for w in rnd["weights"].values()), rnd
        ckpt = coord / "runs" / "fedsynth" / "checkpoints" / rnd["checkpoint"]
        assert ckpt.is_dir() and any(ckpt.iterdir()), rnd
        assert sorted(rnd["evaluate"]["accepted"]) == node_ids, rnd
        assert (coord / "runs" / "fedsynth" / "consortium-report.json").is_file()
        # The live database with its -wal/-shm, before a clean shutdown folds the WAL in.
        snapshot = tmp_path / "state-snapshot"
        snapshot.mkdir()
        for p in coord.glob("state.db*"):
            shutil.copy(p, snapshot)
    finally:
        procs.stop_all()
        timings["total_s"] = time.monotonic() - t0
        (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
        print("timings:", json.dumps(timings))

    # Each site kept its own signed record of the round.
    for site, data in data_dirs.items():
        out = data / "output"
        assert verify_log(out / "audit.jsonl", {site: site_keys[site]}) >= 2, site
        report = json.loads((out / "privacy-reports" / "report-round-1.json").read_text())
        assert report["site_id"] == site and report["round"] == 1
        assert report["privacy"]["epsilon"] > 0
        assert not (data / "audit.jsonl").exists()  # the launcher refused nothing

    # Nothing of any note reaches the coordinator's disk. Windows that also occur in
    # the released source (phrase banks in client/demo/text.py) are public text,
    # not patient data: the SuperExec unpacks the bundle under FLWR_HOME.
    public = set().union(*(harness.windows(p.read_text(errors="replace"))
                           for p in install.rglob("*") if p.is_file() and p.suffix != ".pyc"))
    notes = {site: [json.loads(line)["text"] for line in (d / "notes.jsonl").read_text().splitlines()]
             for site, d in data_dirs.items()}
    note_windows = set().union(*(harness.windows(t) for texts in notes.values() for t in texts))
    # The exemption stays small: a bundle that shipped the notes themselves would fail here.
    assert len(note_windows & public) < len(note_windows) // 20, len(note_windows & public)
    secret = note_windows - public
    probe = tmp_path / "probe.txt"  # the scan must be able to fail: a planted copy is found
    probe.write_text("header " + notes["site-b"][3] + " trailer")
    assert harness.leaked_windows([probe], secret)
    coordinator_files = [p for p in coord.rglob("*") if p.is_file()]
    names = {p.name for p in coordinator_files}
    assert {"state.db", "consortium-summary.json", "audit.jsonl"} <= names, sorted(names)
    snapshots = sorted(snapshot.iterdir())
    assert any(p.name.endswith("-wal") for p in snapshots), snapshots
    coordinator_files += snapshots + [logs / "coordinator.log", logs / "flwr-run.log"]
    assert harness.leaked_windows(coordinator_files, secret) == []
