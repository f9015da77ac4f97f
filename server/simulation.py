"""Run the fedsynth app under Flower's simulation engine on this machine.

One place for what the demo and the study both do: a private ``FLWR_HOME``
with a connection to a local simulation SuperLink, the SuperLink started as
our own child (so its PID stays in our hands), ``flwr run`` of the project,
then the SuperLink stopped. Ray's AF_UNIX socket paths must stay under 107
bytes, so its temp dir is a short one under /tmp.
"""

from __future__ import annotations

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
from typing import Any

from shared.errors import ConfigError, FedsynthError

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_cpus(n_sites: int, cpus: int | None = None) -> int:
    """Logical CPUs to declare to Ray (Flower's ``init-args.num-cpus``) so all sites run at once.

    Each simulated site reserves one logical CPU (``client-resources.num-cpus =
    1``) and trains and evaluates with one torch thread (``OMP_NUM_THREADS=1``).
    With Ray's default of one logical CPU per core, a 2-core machine runs 2 of 3
    sites and then the third alone, one core idle. Declaring one logical CPU per
    site, up to two per core (each site holds its own model and embedder in
    memory), starts them together. ``cpus`` defaults to the CPUs this process
    may run on. (Flower 1.39 sends ``client-resources.num-cpus`` as an integer,
    so a fractional share per site is not an option.)
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ConfigError(f"n_sites must be a positive integer, got {n_sites!r}")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(cpus, min(n_sites, 2 * cpus))


def config_arg(config: dict[str, Any]) -> str:
    """``--run-config`` text for Flower (TOML scalars)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in config.items())


def run_command(cmd: list[str], *, env: dict[str, str], what: str, cwd: Path | None = None,
                log: Path | None = None) -> None:
    """Run ``cmd``; a non-zero exit becomes a FedsynthError naming ``what`` (and the log)."""
    if log is None:
        proc = subprocess.run(cmd, env=env, cwd=cwd)
    else:
        with open(log, "a") as fh:
            proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        where = f"; see {log}" if log else ""
        raise FedsynthError(f"{what} failed (exit {proc.returncode}){where}")


def run_simulation(
    *,
    work_dir: Path,
    federation: str,
    n_sites: int,
    run_config: dict[str, Any],
    env: dict[str, str],
    superlink_log: Path,
    flwr_log: Path | None = None,
) -> None:
    """``flwr run`` the project on a fresh local simulation SuperLink with ``n_sites`` nodes.

    ``env`` must carry ``FLWR_HOME`` (a private directory) plus whatever the
    ServerApp/ClientApps read (``FEDSYNTH_SIM_ROOT``, ``FEDSYNTH_COORD_RUN_DIR``).
    ``flwr_log=None`` streams the run to the console.
    """
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        f"options.num-supernodes = {n_sites}\n"
        "options.backend.client-resources.num-cpus = 1\n"
        f"options.backend.init-args.num-cpus = {ray_cpus(n_sites)}\n"
    )
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = env | {"RAY_TMPDIR": ray_dir, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    with open(superlink_log, "w") as log:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work_dir,
        )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if link.poll() is not None:
                raise FedsynthError(f"the simulation SuperLink exited; see {superlink_log}")
            time.sleep(0.5)
        run_command(
            [str(BIN / "flwr"), "run", str(PROJECT), federation, "--stream",
             "--run-config", config_arg(run_config)],
            env=env, what=f"the federated run ({federation})", cwd=work_dir, log=flwr_log,
        )
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
        shutil.rmtree(ray_dir, ignore_errors=True)
