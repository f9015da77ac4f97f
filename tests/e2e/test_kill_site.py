"""A site SIGKILLed in the middle of training; the round still aggregates the others (e2e, gRPC).

Processes (all on 127.0.0.1, free ports, plain gRPC: TLS and SuperNode auth are
covered by test_deployment.py): one SuperLink, three SuperNodes (``site-0``,
``site-1``, ``site-2``) that run the bundle's ClientApp in subprocesses. The
bundle is a temporary copy of this repo whose client/site.py is the TEST-ONLY
fake (tests/fake_site.py). ``site-2``'s environment sets
``FEDSYNTH_E2E_HANG_IN_TRAIN``: its fake site writes a marker file when training
starts and hangs; the test then SIGKILLs that SuperNode's whole process group
(SuperNode + ClientApp process). With ``min-sites=2`` the round must aggregate
site-0 (+1, bucket 10) and site-1 (+2, bucket 20) -> 5/3 after
``timeout.train``, and the summary must list the killed node as missing.
Run with ``pytest -m e2e tests/e2e/test_kill_site.py``.
"""

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from tests.e2e.harness import BIN, Procs, build_app, free_port, wait_for
from tests.fake_site import write_base_model_config

pytestmark = pytest.mark.e2e

TRAIN_TIMEOUT = 30  # seconds the coordinator waits for train replies (bounds the test)
SITES = ("site-0", "site-1", "site-2")
VICTIM = "site-2"


def test_site_killed_mid_train_round_completes(tmp_path):
    fleet, control = free_port(), free_port()
    home = tmp_path / "coord-flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{control}"\ninsecure = true\n')
    base_env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    base_env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    base_env.pop("FEDSYNTH_E2E_HANG_IN_TRAIN", None)
    coord_env = base_env | {"FLWR_HOME": str(home), "FEDSYNTH_COORD_RUN_DIR": str(tmp_path / "coord"),
                            "FEDSYNTH_COORD_BASE_MODEL_CONFIG": str(
                                write_base_model_config(tmp_path / "base-model"))}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(logs)
    app = build_app(tmp_path / "bundle")
    marker = tmp_path / "victim-in-train"

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=coord_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    def online() -> list[dict] | None:
        out = flwr("supernode", "ls", "local", "--format", "json")
        try:
            up = [n for n in json.loads(out.stdout)["nodes"] if n.get("status") == "online"]
        except (ValueError, KeyError):
            return None
        return up if len(up) >= len(SITES) else None

    try:
        procs.start("superlink", [
            str(BIN / "flower-superlink"), "--insecure",
            "--fleet-api-type", "grpc-rere", "--fleet-api-address", f"127.0.0.1:{fleet}",
            "--host", "127.0.0.1", "--port", str(control),
            "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db")], coord_env, tmp_path)
        wait_for(lambda: flwr("supernode", "ls", "local").returncode == 0, 60,
                 "the SuperLink's Control API", step=2)
        for site in SITES:
            data = tmp_path / "sites" / site
            data.mkdir(parents=True)
            (data / "notes.jsonl").write_text("")
            env = base_env | {"FLWR_HOME": str(tmp_path / f"{site}-flwr")}
            if site == VICTIM:
                env["FEDSYNTH_E2E_HANG_IN_TRAIN"] = str(marker)
            procs.start(f"supernode-{site}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"data-dir='{data}' site-id='{site}'"], env, tmp_path)
        wait_for(online, 90, "three SuperNodes online", step=2)

        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(app), "local", "--stream", "--run-config",
             f"num-rounds=1 min-sites=2 timeout.wait-sites=60 timeout.train={TRAIN_TIMEOUT} "
             f"timeout.evaluate={TRAIN_TIMEOUT}"],
            env=coord_env, cwd=tmp_path, stdout=open(logs / "flwr-run.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
        try:
            wait_for(marker.exists, 120, f"{VICTIM} to enter training", step=0.5)
            victim = dict(procs.procs)[f"supernode-{VICTIM}"]
            os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp process
            victim.wait(timeout=10)
            run.wait(timeout=4 * TRAIN_TIMEOUT + 120)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(timeout=10)
        assert all(p.poll() is None for name, p in procs.procs if name != f"supernode-{VICTIM}")
    finally:
        procs.stop_all()

    summary_path = tmp_path / "coord" / "fedsynth" / "consortium-summary.json"
    assert summary_path.exists(), (logs / "flwr-run.log").read_text()[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed", summary
    rnd = summary["rounds"][0]
    train = rnd["train"]
    assert len(train["sent"]) == 3 and len(train["accepted"]) == 2, rnd
    dead = set(train["sent"]) - set(train["accepted"])
    assert len(dead) == 1
    assert sorted(train["missing"] + train["failed"]) == sorted(dead), train  # listed, not silently dropped
    assert train["declined"] == {} and train["refused"] == {}
    # aggregated from the two live sites only: buckets 10 and 20, values +1 and +2
    assert rnd["aggregated"] is True
    assert sorted(p["patients_bucket"] for p in rnd["privacy"].values()) == [10, 20]
    from safetensors.numpy import load_file

    ckpt = tmp_path / "coord" / "fedsynth" / "checkpoints" / rnd["checkpoint"]
    for value in load_file(str(ckpt / "adapter_model.safetensors")).values():
        np.testing.assert_allclose(value, 5 / 3, rtol=1e-6)
    # evaluation went on without the killed site as well
    ev = rnd["evaluate"]
    assert sorted(ev["accepted"]) == sorted(train["accepted"]), ev
    assert dead <= set(ev["missing"]) | set(ev["failed"]), ev
    assert ev["mean"] == {"diversity.distinct_1": 0.5}
