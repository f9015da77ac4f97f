"""One full federated round through `flwr run` on a local simulation SuperLink (e2e).

The app bundle is a temporary copy of this repo in which client/site.py is
replaced by tests/e2e/fake_site.py (TEST-ONLY: known answers, no model, no
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

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(dst: Path) -> Path:
    app = dst / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app)
    for pkg in ("shared", "server", "client"):
        shutil.copytree(ROOT / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("fake_site.py"), app / "client" / "site.py")
    return app


def test_one_simulated_round(tmp_path):
    port = free_port()
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    )
    for k in range(2):
        (tmp_path / "sim" / f"site-{k}").mkdir(parents=True)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDSYNTH_SIM_ROOT": str(tmp_path / "sim"),
        "FEDSYNTH_COORD_RUN_DIR": str(tmp_path / "coord"),
        # Ray's AF_UNIX socket paths must stay under 107 bytes: a short dir, not tmp_path.
        "RAY_TMPDIR": ray_dir,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    app = build_app(tmp_path)
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
            [str(BIN / "flwr"), "run", str(app), "sim", "--stream",
             "--run-config", "num-rounds=1 min-sites=2 timeout.wait-sites=120"],
            env=env, capture_output=True, text=True, timeout=540, cwd=tmp_path,
        )
        summary_path = tmp_path / "coord" / "fedsynth" / "consortium-summary.json"
        assert summary_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "completed"
        rnd = summary["rounds"][0]
        assert len(rnd["train"]["accepted"]) == 2, (rnd["train"], out.stdout[-3000:])
        assert rnd["aggregated"] is True
        assert rnd["evaluate"]["mean"] == {"diversity.distinct_1": 0.5}
        from safetensors.numpy import load_file

        adapter = load_file(str(tmp_path / "coord" / "fedsynth" / "checkpoints" / "round-0001"
                                / "adapter_model.safetensors"))
        for value in adapter.values():  # site-0 sends +1, site-1 +2, equal weights
            np.testing.assert_allclose(value, 1.5)
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
