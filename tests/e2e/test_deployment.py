"""Deployment over real gRPC + TLS + SuperNode authentication, with the site launcher (e2e).

Processes: one SuperLink (Fleet API gRPC on 127.0.0.1, Control API on
127.0.0.1, TLS from server/pki.py, --enable-supernode-auth, SQLite state), two
registered SuperNodes in ``--isolation process`` each served by
``python -m client.launcher serve`` with a pin of the agreed bundle. The site
installation and the agreed bundle are a temporary copy of this repo whose
client/site.py is the TEST-ONLY fake (tests/fake_site.py). Checks: a round
completes; an unregistered key is refused; a tampered bundle is refused by both
sites and none of its code runs; revocation stops a live SuperNode; no 8-word
window of any site's notes reaches any coordinator-side file.
Run with ``pytest -m e2e tests/e2e/test_deployment.py``.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.pki import make_consortium_pki
from tests.e2e.harness import BIN, Procs, build_app, free_port, leaked_windows, wait_for, windows
from tests.fake_site import write_base_model_config

ROOT = Path(__file__).parents[2]
PY = sys.executable

pytestmark = pytest.mark.e2e

NOTES = {
    "site-0": "[FICTIONAL DEMO RECORD] Mr Oswin Tallowmere attended the liaison clinic on the "
              "harbour ward describing three nights of broken sleep and voices commenting on "
              "his crossword habit while the tide tables were read aloud",
    "site-1": "[FICTIONAL DEMO RECORD] Ms Perdita Quillfeather reports a low mood since the "
              "orchard closed with early waking appetite loss and guilt about the unsold quince "
              "jelly stacked in her pantry behind the bicycle",
}


def test_deployment(tmp_path):
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    pki = make_consortium_pki(tmp_path / "pki", sites=["site-0", "site-1", "rogue"])
    fleet, control = free_port(), free_port()
    coord_home = tmp_path / "coord-flwr"
    coord_home.mkdir()
    (coord_home / "config.toml").write_text(
        '[superlink]\ndefault = "hosp"\n\n[superlink.hosp]\n'
        f'address = "127.0.0.1:{control}"\nroot-certificates = "{pki["ca_cert"]}"\n')
    base_env = os.environ | {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    base_env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
    coord_env = base_env | {"FLWR_HOME": str(coord_home),
                            "FEDSYNTH_COORD_RUN_DIR": str(tmp_path / "coord"),
                            "FEDSYNTH_COORD_BASE_MODEL_CONFIG": str(
                                write_base_model_config(tmp_path / "base-model"))}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(logs)
    marker = tmp_path / "TAMPERED-CODE-RAN"

    # The agreed release: installed at the sites and submitted by the coordinator.
    install = build_app(tmp_path / "site-install")
    pin_path = tmp_path / "pin.json"
    subprocess.run([PY, "-m", "client.launcher", "pin", str(install), "--out", str(pin_path)],
                   cwd=install, env=base_env, check=True, timeout=60, capture_output=True)

    def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=coord_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout)

    def nodes() -> list[dict]:
        out = flwr("supernode", "ls", "hosp", "--format", "json")
        try:
            return json.loads(out.stdout)["nodes"]
        except (ValueError, KeyError):
            return []

    try:
        link = procs.start("superlink", [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(pki["ca_cert"]), "--ssl-certfile", str(pki["server_cert"]),
            "--ssl-keyfile", str(pki["server_key"]),
            "--fleet-api-type", "grpc-rere", "--fleet-api-address", f"127.0.0.1:{fleet}",
            "--host", "127.0.0.1", "--port", str(control),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--database", str(tmp_path / "state.db")], coord_env, tmp_path)
        wait_for(lambda: flwr("supernode", "ls", "hosp").returncode == 0, 60,
                 "the SuperLink's Control API", step=2)
        assert link.poll() is None

        registered = {}
        for site in ("site-0", "site-1"):
            out = flwr("supernode", "register", str(pki[f"{site}.pub"]), "hosp", "--name", site)
            assert out.returncode == 0, out.stdout + out.stderr
            registered[site] = int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1))

        sites = {}
        for site in ("site-0", "site-1"):
            data = tmp_path / "sites" / site
            data.mkdir(parents=True)
            (data / "notes.jsonl").write_text(json.dumps(
                {"note_id": f"{site}-n1", "patient_id": f"{site}-p0001", "icd10": ["F32.1"],
                 "text": NOTES[site], "date": "2020-01-01", "identifiers": []}) + "\n")
            home = tmp_path / f"{site}-flwr"
            home.mkdir()
            env = base_env | {"FLWR_HOME": str(home)}
            runtime = free_port()
            secret = home / "superexec.secret"  # Runtime API auth, as deploy/site.sh does it
            secret.write_bytes(os.urandom(32))
            procs.start(f"supernode-{site}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fleet}",
                "--root-certificates", str(pki["ca_cert"]),
                "--auth-supernode-private-key", str(pki[site]),
                "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime),
                "--superexec-auth-secret-file", str(secret),
                "--node-config", f"data-dir='{data}' site-id='{site}'"], env, tmp_path)
            procs.start(f"launcher-{site}", [
                PY, "-m", "client.launcher", "serve", "--runtime-api-address",
                f"127.0.0.1:{runtime}", "--insecure", "--pin", str(pin_path),
                "--audit-log", str(data / "audit.jsonl"), "--site", site, "--poll", "0.5",
                "--superexec-auth-secret-file", str(secret)],
                env, install)
            sites[site] = data
        def online_nodes() -> list[dict] | None:
            up = [n for n in nodes() if n.get("status") == "online"]
            return up if len(up) >= 2 else None

        online = wait_for(online_nodes, 90, "two SuperNodes online", step=2)
        node_ids = sorted(int(n["node-id"]) for n in online)
        assert node_ids == sorted(registered.values())
        timings["start_to_online_s"] = time.monotonic() - t0

        # An unregistered key is refused at activation.
        rogue = procs.start("supernode-rogue", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fleet}",
            "--root-certificates", str(pki["ca_cert"]),
            "--auth-supernode-private-key", str(pki["rogue"]),
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(free_port()),
            "--max-retries", "1"], base_env | {"FLWR_HOME": str(tmp_path / "rogue-flwr")}, tmp_path)
        rogue.wait(timeout=90)
        assert rogue.returncode == 305 or "Failed to activate SuperNode" in procs.log("supernode-rogue"), \
            (rogue.returncode, procs.log("supernode-rogue")[-2000:])

        # One round with the agreed bundle.
        t = time.monotonic()
        out = flwr("run", str(install), "hosp", "--stream", "--run-config",
                   "num-rounds=1 min-sites=2 timeout.wait-sites=60 timeout.train=120 "
                   "timeout.evaluate=120", timeout=300)
        timings["agreed_round_s"] = time.monotonic() - t
        summary_path = tmp_path / "coord" / "fedsynth" / "consortium-summary.json"
        assert summary_path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "completed", summary
        # sites are named as registered (`--name`), not by node id
        assert {summary["site_names"][str(registered[site])] for site in sites} == set(sites), summary
        rnd = summary["rounds"][0]
        assert sorted(rnd["train"]["accepted"]) == node_ids, (rnd, procs.log("launcher-site-0")[-3000:])
        assert rnd["aggregated"] is True
        assert rnd["evaluate"]["mean"] == {"diversity.distinct_1": 0.5}

        # The coordinator edits client/app.py in the submitted bundle: both sites refuse it.
        tampered = build_app(tmp_path / "coordinator-edit")
        with open(tampered / "client" / "app.py", "a") as fh:
            fh.write(f"\nfrom pathlib import Path as _P\n_P({str(marker)!r}).write_text('ran')\n")
        t = time.monotonic()
        out = flwr("run", str(tampered), "hosp", "--stream", "--run-config",
                   "run-name='tampered' num-rounds=1 min-sites=2 timeout.wait-sites=60 "
                   "timeout.train=60 timeout.evaluate=60", timeout=300)
        timings["tampered_run_s"] = time.monotonic() - t
        summary = json.loads((tmp_path / "coord" / "tampered" / "consortium-summary.json").read_text())
        rnd = summary["rounds"][0]
        assert rnd["train"]["accepted"] == [] and rnd["aggregated"] is False, rnd
        assert sorted(rnd["train"]["failed"]) == node_ids, rnd
        assert summary["status"].startswith("failed: no site's update was aggregated"), summary
        assert not marker.exists()
        for site, data in sites.items():
            assert "REFUSED run" in procs.log(f"launcher-{site}")
            # the launcher's refusals go to its own signed chain beside --audit-log
            log = data / "launcher.audit.jsonl"
            entries = [json.loads(line) for line in log.read_text().splitlines()]
            assert {e["kind"] for e in entries} == {"update_rejected"}
            assert all(e["data"]["reason"] == "bundle_not_trusted" for e in entries)

        # Revocation: unregistering a live SuperNode makes it shut down.
        t = time.monotonic()
        victim = dict(procs.procs)["supernode-site-1"]
        out = flwr("supernode", "unregister", str(registered["site-1"]), "hosp")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for(lambda: victim.poll() is not None, 90, "the revoked SuperNode to exit")
        timings["revoke_to_exit_s"] = time.monotonic() - t
        assert dict(procs.procs)["supernode-site-0"].poll() is None  # the other site stays up
    finally:
        procs.stop_all()
        timings["total_s"] = time.monotonic() - t0
        (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
        print("timings:", json.dumps(timings))

    # Nothing of any note reaches the coordinator's disk.
    secret = set().union(*(windows(text) for text in NOTES.values()))
    probe = tmp_path / "probe.txt"  # the scan must be able to fail: a planted copy is found
    probe.write_text("prefix " + NOTES["site-1"][40:] + " suffix")
    assert leaked_windows([probe], secret)
    coordinator_files = [p for p in tmp_path.glob("state.db*") if p.is_file()]
    assert coordinator_files, "no SuperLink database written"
    coordinator_files += [p for p in (tmp_path / "coord").rglob("*") if p.is_file()]
    coordinator_files += [p for p in coord_home.rglob("*") if p.is_file()]
    coordinator_files += [logs / "superlink.log"]
    assert leaked_windows(coordinator_files, secret) == []
