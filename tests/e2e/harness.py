"""What the e2e tests share: the app bundle (the project's packages with the TEST-ONLY fake site as
client/site.py), free ports, the processes they start, waiting, and the 8-word-window leak check."""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]
FAKE_SITE = ROOT / "tests" / "fake_site.py"
BIN = Path(sys.executable).parent
WINDOW = 8  # words per window of the leak check


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(dst: Path, name: str = "fedsynth") -> Path:
    """``dst/name``: pyproject.toml, shared/, server/, client/ with client/site.py the fake site."""
    app = dst / name
    app.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", app)
    for pkg in ("shared", "server", "client"):
        shutil.copytree(ROOT / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(FAKE_SITE, app / "client" / "site.py")
    return app


def windows(text: str) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    return {hashlib.blake2b(" ".join(words[i:i + WINDOW]).encode(), digest_size=16).digest()
            for i in range(len(words) - WINDOW + 1)}


def leaked_windows(paths: list[Path], secret: set[bytes]) -> list[str]:
    """Files (and how many windows) in which any 8-word window of a note appears."""
    hits = []
    for path in paths:
        found = windows(path.read_bytes().decode("utf-8", errors="replace")) & secret
        if found:
            hits.append(f"{path}: {len(found)} windows")
    return hits


class Procs:
    """Every process the test starts, each in its own process group; stopped in reverse order."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may hold children (task processes, flower-superexec)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


def wait_for(predicate, timeout: float, what: str, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
