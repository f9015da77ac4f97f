"""The e2e tests' app bundle: the project's packages with the TEST-ONLY fake site as client/site.py."""

import shutil
import socket
from pathlib import Path

ROOT = Path(__file__).parents[2]
FAKE_SITE = ROOT / "tests" / "fake_site.py"


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
