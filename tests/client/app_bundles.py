"""A stand-in fedsynth app directory for the bundle-pin and launcher tests.

Its ``client/app.py`` writes a marker file when imported, so a test can show the
bundle's own code never ran.
"""

from types import SimpleNamespace

PYPROJECT = """[project]
name = "fedsynth"
version = "{version}"

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
num-rounds = 1
"""

MARKER_APP = """from pathlib import Path
Path({marker!r}).write_text("bundle code ran")
app = None
"""


def make_app(root, marker, *, version="0.1.0", extra=""):
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(version=version))
    for pkg in ("client", "server", "shared"):
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "client" / "app.py").write_text(MARKER_APP.format(marker=str(marker)) + extra)
    (root / "server" / "app.py").write_text("app = None\n")
    return root


def agreed_bundle(tmp_path):
    """The consortium's agreed app in ``tmp_path/fedsynth`` and this site's pin of it."""
    from client.bundle_trust import write_pin

    marker = tmp_path / "MARKER"
    app = make_app(tmp_path / "fedsynth", marker)
    pin = write_pin(app, tmp_path / "pin.json")
    return SimpleNamespace(app=app, marker=marker, pin=pin, pin_path=tmp_path / "pin.json")
