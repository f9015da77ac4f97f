"""The SuperNode's Runtime API with --superexec-auth-secret-file, as deploy/site.sh starts it (e2e).

A real ``flower-supernode --isolation process --superexec-auth-secret-file`` (no
SuperLink needed: its Runtime API serves before it connects). The launcher's
poller (client/launcher.py) with the site's secret may acquire tasks; a local
process without it, or with another secret, gets 401. Run with
``pytest -m e2e tests/e2e/test_superexec_auth.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import free_port, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _acquire(port: int, secret: bytes | None) -> str:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from client.launcher import _runtime_client

    client, invoker = _runtime_client(f"127.0.0.1:{port}", None, True, None, secret)
    invoker.max_tries = 1
    invoker.should_giveup = lambda exc: True  # Flower's default SIGINTs the process on a 401
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return "accepted"
    except Exception as exc:
        return "401" if "401" in str(exc) else f"error: {type(exc).__name__}"
    finally:
        client.close()


def test_only_the_launcher_with_the_site_secret_may_poll_for_tasks(tmp_path):
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)
    port = free_port()
    env = os.environ | {"FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
                        "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen(
        [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
         "--isolation", "process", "--superexec-auth-secret-file", str(tmp_path / "secret"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _acquire(port, secret) == "accepted", 60, "the Runtime API", step=1)
        assert _acquire(port, None) == "401"
        assert _acquire(port, os.urandom(32)) == "401"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
