"""One full federated round through `flwr run` on a local simulation SuperLink (e2e).

The app bundle is a temporary copy of this repo in which client/site.py is
replaced by tests/fake_site.py (TEST-ONLY: known answers, no model, no
notes), so this exercises Flower, the real ClientApp/ServerApp wiring and the
wire checks, not training. Run with ``pytest -m e2e tests/e2e``.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.harness import build_app, free_port
from tests.fake_site import write_base_model_config

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


SITES = ("site-a", "site-b", "site-c")


def run_simulation(tmp_path: Path, *, sites: int, run_config: str, extra_config: str = ""):
    """`flwr run` the fake-site bundle on a fresh simulation SuperLink; (summary, last adapter, output).

    ``extra_config`` is appended to the bundle's ``[tool.flwr.app.config]`` (keys the
    repo's pyproject may not declare yet; Flower refuses overrides of undeclared keys).
    """
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        f"options.num-supernodes = {sites}\noptions.backend.client-resources.num-cpus = 1\n"
    )
    for name in SITES[:sites]:  # partition i -> i-th sorted dir holding a notes.jsonl
        (tmp_path / "sim" / name).mkdir(parents=True)
        (tmp_path / "sim" / name / "notes.jsonl").write_text("")
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDSYNTH_SIM_ROOT": str(tmp_path / "sim"),
        "FEDSYNTH_COORD_RUN_DIR": str(tmp_path / "coord"),
        "FEDSYNTH_COORD_BASE_MODEL_CONFIG": str(write_base_model_config(tmp_path / "base-model")),
        # Ray's AF_UNIX socket paths must stay under 107 bytes: a short dir, not tmp_path.
        "RAY_TMPDIR": ray_dir,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    app = build_app(tmp_path, "app")
    if extra_config:
        pyproject = app / "pyproject.toml"
        text = pyproject.read_text()
        missing = "\n".join(line for line in extra_config.splitlines()
                            if line.split("=")[0].strip() not in text)
        pyproject.write_text(text.replace("[tool.flwr.app.config]\n",
                                          f"[tool.flwr.app.config]\n{missing}\n", 1))
    log = open(tmp_path / "superlink.log", "w")
    link = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--disable-runtime-dependency-installation"],
        # cwd outside the repo: Ray workers put their cwd on sys.path, and the repo's
        # own client/site.py would shadow the bundle's fake one.
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        out = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "sim", "--stream", "--run-config", run_config],
            env=env, capture_output=True, text=True, timeout=540, cwd=tmp_path,
        )
        summary_path = tmp_path / "coord" / "fedsynth" / "consortium-summary.json"
        assert summary_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads(summary_path.read_text())
        from safetensors.numpy import load_file

        ckpts = sorted((tmp_path / "coord" / "fedsynth" / "checkpoints").glob("round-*"))
        adapter = load_file(str(ckpts[-1] / "adapter_model.safetensors")) if ckpts else None
        return summary, adapter, out.stdout[-3000:]
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_one_simulated_round(tmp_path):
    summary, adapter, out = run_simulation(
        tmp_path, sites=2, run_config="num-rounds=1 min-sites=2 timeout.wait-sites=120")
    assert summary["status"] == "completed"
    rnd = summary["rounds"][0]
    assert len(rnd["train"]["accepted"]) == 2, (rnd["train"], out)
    assert rnd["aggregated"] is True
    assert rnd["evaluate"]["mean"] == {"diversity.distinct_1": 0.5}
    for value in adapter.values():  # site-a sends +1 (bucket 10), site-b +2 (bucket 20)
        np.testing.assert_allclose(value, 5 / 3, rtol=1e-6)
