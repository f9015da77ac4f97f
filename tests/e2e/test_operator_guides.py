"""The operator guides, followed literally: ``docs/coordinator.md`` then ``docs/hospital-it.md`` (e2e).

The test runs the guides' own command blocks, read from the markdown at test time:
every fenced block preceded by ``<!-- e2e: NAME -->`` is executed (``bash -e -o
pipefail``) exactly as written, so a change to the docs changes what runs here. It
covers: coordinator certificates (``fedsynth-coordinator pki``), the coordinator and
site env files made from ``deploy/*.env.example`` with the guides' own ``install``
command, site keys (``ssh-keygen``, ``fedsynth-site keygen``, the SuperExec secret,
the ledger key), the pins, registration (``flwr supernode register … --name``),
``fedsynth-site doctor``, a SecAgg+ round over TLS with ``fedsynth-coordinator run``
(two sites), ``fedsynth-site budget`` and ``fedsynth-verify`` on a site's output,
which must then fail once a byte of a privacy report is flipped.

The harness (everything the test substitutes; nothing else differs from the text):

- **Temporary roots.** Each machine (coordinator, site-a, site-b) gets its own
  directory R; in every block and env file the absolute paths ``/srv/``,
  ``/etc/fedsynth``, ``/opt/fedsynth``, ``/secure/`` and ``/path/`` become ``R/srv/`` …
- **No root.** ``sudo`` (options such as ``-u fedsynth`` dropped), ``useradd``,
  ``groupadd``, ``chown`` and ``systemctl`` are shims first on ``PATH``: ``sudo``
  runs the command as the test's user, the others only log. ``install`` drops
  ``-o``/``-g`` and calls ``/usr/bin/install`` (modes are kept).
- **No network, no wheelhouse.** The release tree (``pyproject.toml``, ``client/``,
  ``server/``, ``shared/``, ``deploy/``, ``docs/`` of this checkout) is copied to
  ``R/opt/fedsynth`` in place of steps 1–2's ``git archive`` + ``pip install``, and
  ``R/opt/fedsynth/.venv`` links to the test's virtual environment. ``hf download``
  is a tiny saved random llama in ``R/srv/site/models/base``; the notes export is
  the fictional demo notes. ``ca.crt`` and the sites' ``.pub`` travel by file copy.
- **Processes instead of systemd.** Where the guides enable a unit, the test starts
  the unit's ``ExecStart`` (``deploy/coordinator.sh``, ``deploy/site.sh supernode`` and
  ``… launcher``) with the unit's ``EnvironmentFile`` loaded (``set -a; . FILE``),
  ``WorkingDirectory`` and ``PATH`` (the venv's ``bin/`` first). Coordinator blocks
  after step 3 run with ``coordinator.env`` loaded, as step 4 says.
- **Edits an operator makes by hand** (``edit_env``): both machines on 127.0.0.1 with
  free ports; the sites' ``FEDSYNTH_SITE_DEVICE=cpu``; a two-site test consortium
  (``FEDSYNTH_SITE_MIN_SITES=2``, ``…_MIN_SECAGG_GROUP_SIZE=2``, ``…_K_MIN=2``), site-b's
  blocks and env file with ``site-a`` replaced by ``site-b``; the coordinator's
  ``FEDSYNTH_COORD_BASE_MODEL_CONFIG`` set to the sites' model; the first run's
  ``min-sites=3`` lowered to 2 and the small-model run settings of
  ``test_deploy_scripts.RUN_CONFIG`` appended (2 busy CPU cores).

Run with ``pytest -m e2e tests/e2e/test_operator_guides.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client.demo.data import write_demo
from client.model import tiny_random_model
from tests.e2e import harness
from tests.e2e.test_deploy_scripts import RUN_CONFIG

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
VENV = Path(sys.prefix)
SITES = ("site-a", "site-b")
MARK = re.compile(r"<!-- e2e: ([\w-]+) -->\n```[a-z]*\n(.*?)\n```", re.S)
MAPPED = re.compile(r"(?<![\w.\-/])(/srv/|/etc/fedsynth|/opt/fedsynth|/secure/|/path/)")
SHIMS = {
    "sudo": '#!/bin/bash\n# harness: no root; run the command as this user\n'
            'while [ $# -gt 0 ]; do case "$1" in -u|-g) shift 2;; -*) shift;; *) break;; esac; done\n'
            'exec "$@"\n',
    "install": '#!/bin/bash\n# harness: keep modes, drop owner and group\na=()\n'
               'while [ $# -gt 0 ]; do case "$1" in -o|-g) shift 2;; *) a+=("$1"); shift;; esac; done\n'
               'exec /usr/bin/install "${a[@]}"\n',
    **{name: f'#!/bin/sh\necho "{name} $*" >> "$SHIM_LOG"\n'
       for name in ("useradd", "groupadd", "chown", "systemctl")},
}

COORD_BLOCKS = {"coord-dirs", "coord-pki", "coord-pki-install", "coord-env", "coord-cli-config",
                "coord-register", "coord-pin", "coord-run"}
SITE_BLOCKS = {"site-dirs", "site-keys", "site-ownership", "site-pin", "site-env", "site-doctor",
               "site-after-round", "site-verify"}


def doc_blocks(doc: str) -> dict[str, str]:
    """The ``<!-- e2e: NAME -->`` fenced blocks of ``docs/<doc>``, by name."""
    blocks = dict(MARK.findall((DOCS / doc).read_text()))
    assert blocks, f"docs/{doc} has no <!-- e2e: --> blocks"
    return blocks


def rooted(text: str, root: Path) -> str:
    """The harness's path map: the guides' absolute paths under this machine's root."""
    return MAPPED.sub(lambda m: f"{root}{m.group(1)}", text)


def edit_env(path: Path, root: Path, values: dict[str, object], rename: tuple[str, str] | None = None) -> None:
    """Edit an env file as an operator would: paths under ``root``, the given values set."""
    text = rooted(path.read_text(), root)
    if rename:
        text = text.replace(*rename)
    for key, value in values.items():
        text, n = re.subn(rf"^#?{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert n == 1, f"{path.name}: {key} is not in the example"
    path.write_text(text)


class Machine:
    """One host of the guides: its root, its release tree and the shell that runs blocks."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.opt = root / "opt" / "fedsynth"
        self.opt.mkdir(parents=True)
        for name in ("pyproject.toml",):
            shutil.copy(ROOT / name, self.opt)
        for pkg in ("shared", "server", "client", "deploy", "docs"):
            shutil.copytree(ROOT / pkg, self.opt / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (self.opt / ".venv").symlink_to(VENV)  # stands for steps 1-2's venv + pip install
        self.env = env | {"PATH": f"{self.opt / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"}

    def run(self, block: str, *, cwd: Path | None = None, env_file: Path | None = None,
            subs: tuple[tuple[str, str], ...] = (), check: bool = True) -> subprocess.CompletedProcess:
        for old, new in subs:
            assert old in block, (old, block)
            block = block.replace(old, new)
        script = rooted(block, self.root)
        if env_file is not None:
            script = f"set -a; . {env_file}; set +a\n{script}"
        out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd or self.root,
                             env=self.env, capture_output=True, text=True, timeout=300)
        if check:
            assert out.returncode == 0, (script, out.stdout[-3000:], out.stderr[-3000:])
        return out

    def runner(self, blocks: dict[str, str], site: str):
        """Run a site block by name, ``site-a`` replaced by ``site`` (the guide's example site)."""
        def run(name: str, **kw) -> subprocess.CompletedProcess:
            block = blocks[name]
            return self.run(block, subs=(("site-a", site),) if site != "site-a" and "site-a" in block
                            else (), **kw)
        return run

    def service(self, procs: harness.Procs, name: str, env_file: Path, exec_start: str) -> None:
        """What the systemd unit does: EnvironmentFile, WorkingDirectory, PATH, ExecStart."""
        cmd = ["bash", "-c", f"set -a; . {env_file}; set +a; exec {self.opt}/{exec_start}"]
        procs.start(name, cmd, self.env, self.opt)


def test_guides_mark_every_block_the_e2e_test_runs():
    """Fast: a marker dropped or renamed in an edit is caught without running the round."""
    assert set(doc_blocks("coordinator.md")) == COORD_BLOCKS
    assert set(doc_blocks("hospital-it.md")) == SITE_BLOCKS


@pytest.mark.e2e
def test_operator_guides_as_written(tmp_path):
    coord_doc, site_doc = doc_blocks("coordinator.md"), doc_blocks("hospital-it.md")
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSYNTH_", "FLWR_"))}
    base |= {"PATH": f"{shims}{os.pathsep}{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
             "SHIM_LOG": str(tmp_path / "shims.log"), "OMP_NUM_THREADS": "1",
             "TOKENIZERS_PARALLELISM": "false"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = harness.Procs(logs)
    fleet, control = harness.free_port(), harness.free_port()

    # The harness's stand-ins for downloads: a tiny saved model, fictional notes.
    model_dir = tmp_path / "download" / "base"
    model, tokenizer = tiny_random_model("llama", seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    demo = write_demo(tmp_path / "demo", seed=5, patients_per_site=40)

    # Coordinator (coordinator.md 1-6).
    coord = Machine(tmp_path / "coordinator", base)
    c_env = coord.root / "etc" / "fedsynth" / "coordinator.env"
    coord.run(coord_doc["coord-dirs"])
    coord.run(coord_doc["coord-pki"])
    coord.run(coord_doc["coord-pki-install"])
    pki = coord.root / "srv" / "fedsynth" / "pki"
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "server.key", "server.pem"]
    assert not (pki / "ca.key").exists()
    coord.run(coord_doc["coord-env"])
    shutil.copytree(model_dir, coord.root / "srv" / "fedsynth" / "model")  # config.json only is needed
    edit_env(c_env, coord.root, {
        "FEDSYNTH_FLEET_ADDRESS": f"127.0.0.1:{fleet}", "FEDSYNTH_CONTROL_PORT": control,
        "FEDSYNTH_COORD_BASE_MODEL_CONFIG": coord.root / "srv/fedsynth/model/config.json"})
    flwr_home = coord.root / "srv" / "fedsynth" / "flwr"
    (flwr_home / "config.toml").write_text(
        rooted(coord_doc["coord-cli-config"], coord.root).replace("127.0.0.1:9093", f"127.0.0.1:{control}"))
    coord.run(coord_doc["coord-pin"])
    coord_pin = json.loads((coord.root / "srv" / "fedsynth" / "pin.json").read_text())

    sites: dict[str, Machine] = {}
    try:
        coord.service(procs, "coordinator", c_env, "deploy/coordinator.sh")
        harness.wait_for(
            lambda: coord.run("flwr supernode ls hosp", env_file=c_env, check=False).returncode == 0,
            90, "the SuperLink's Control API (coordinator.md step 4)", step=2)

        # Sites (hospital-it.md 2-6), each on its own root; ca.crt arrives on approved media.
        for site in SITES:
            m = sites[site] = Machine(tmp_path / site, base)
            subs = (("site-a", site),) if site != "site-a" else ()
            run = m.runner(site_doc, site)
            media = tmp_path / f"media-{site}"
            media.mkdir()
            shutil.copy(pki / "ca.crt", media / "ca.crt")
            run("site-dirs")
            srv = m.root / "srv" / "site"
            shutil.copytree(model_dir, srv / "models" / "base", dirs_exist_ok=True)  # step 3
            shutil.copy(demo.sites[site], srv / "data" / "notes.jsonl")
            run("site-keys", cwd=media)
            run("site-ownership")
            assert (srv / "pki" / site).stat().st_mode & 0o777 == 0o600
            assert (srv / "pki" / "superexec.secret").stat().st_mode & 0o777 == 0o640
            run("site-pin")
            pin = json.loads((srv / "pin.json").read_text())
            assert pin["sha256"] == coord_pin["sha256"], (pin, coord_pin)  # compared out of band
            run("site-env")
            edit_env(m.root / "etc" / "fedsynth" / f"{site}.env", m.root, {
                "FEDSYNTH_SUPERLINK": f"127.0.0.1:{fleet}", "FEDSYNTH_RUNTIME_PORT": harness.free_port(),
                "FEDSYNTH_SITE_DEVICE": "cpu", "FEDSYNTH_SITE_K_MIN": 2, "FEDSYNTH_SITE_MIN_SITES": 2,
                "FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE": 2}, rename=("site-a", site) if subs else None)

            # The coordinator registers the .pub it was sent, under the site's name.
            (coord.root / "path").mkdir(exist_ok=True)
            shutil.copy(srv / "pki" / f"{site}.pub", coord.root / "path" / f"{site}.pub")
            out = coord.run(coord_doc["coord-register"], env_file=c_env,
                            subs=(("site-a", site),) if subs else ())
            assert "registered successfully" in out.stdout, out.stdout

            doctor = run("site-doctor", check=False)
            assert doctor.returncode == 0, (doctor.stdout[-4000:], doctor.stderr[-2000:])
            s_env = m.root / "etc" / "fedsynth" / f"{site}.env"
            m.service(procs, f"{site}-supernode", s_env, "deploy/site.sh supernode")
            m.service(procs, f"{site}-launcher", s_env, "deploy/site.sh launcher")

        def online() -> list[dict] | None:
            out = coord.run("flwr supernode ls hosp --format json", env_file=c_env, check=False)
            try:
                nodes = json.loads(out.stdout)["nodes"]
            except (ValueError, KeyError):
                return None
            up = [n for n in nodes if n.get("status") == "online"]
            return up if len(up) == 2 else None

        nodes = harness.wait_for(online, 120, "both SuperNodes online", step=2)
        node_ids = sorted(int(n["node-id"]) for n in nodes)

        # The first round (coordinator.md step 7), SecAgg+ over TLS.
        small = RUN_CONFIG.replace("num-rounds=1 min-sites=2 secagg=true ", "")
        out = coord.run(coord_doc["coord-run"], env_file=c_env, check=False,
                        subs=(("min-sites=3", f"min-sites=2 {small}"),))
        (logs / "coordinator-run.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-2000:],
                                     procs.log("site-a-launcher")[-3000:])
    finally:
        procs.stop_all()

    summary = json.loads((coord.root / "srv/fedsynth/runs/first/consortium-summary.json").read_text())
    rnd = summary["rounds"][0]
    assert summary["status"] == "completed" and summary["secagg"] is True, summary
    assert rnd["aggregated"] is True and sorted(rnd["train"]["accepted"]) == node_ids, rnd
    # The names given at registration (--name) are the ones the coordinator reports.
    assert sorted(summary["site_names"].values()) == list(SITES), summary["site_names"]
    assert "chown fedsynth-net:" in (tmp_path / "shims.log").read_text()  # the shim stood in

    # Each site afterwards (hospital-it.md step 9): budget, then the auditor's check.
    for site, m in sites.items():
        after = m.runner(site_doc, site)("site-after-round")
        assert "privacy-reports" in after.stdout, after.stdout
        m.runner(site_doc, site)("site-verify")
    # Tampering: one flipped byte in a signed privacy report and the same command fails.
    report = sites["site-a"].root / "srv/site/data/output/privacy-reports/report-round-1.json"
    raw = bytearray(report.read_bytes())
    i = raw.index(b'"round"') + 1
    raw[i] ^= 0x01
    report.write_bytes(bytes(raw))
    tampered = sites["site-a"].run(site_doc["site-verify"], check=False)
    assert tampered.returncode == 1, (tampered.returncode, tampered.stdout[-2000:])
