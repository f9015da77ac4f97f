"""fedsynth-coordinator: --version, pki, and `run` exiting by the run's outcome."""

import json
import os
import stat

from typer.testing import CliRunner

import server.cli as cli
from shared.errors import RunFailedError
from shared.verify import main as verify_main


def test_version_on_all_three_clis(capsys):
    from client.cli import app as site_app

    for app, name in ((cli.app, "fedsynth-coordinator"), (site_app, "fedsynth-site")):
        got = CliRunner().invoke(app, ["--version"])
        assert got.exit_code == 0 and got.output.startswith(f"{name} ") and "flwr" in got.output
    assert verify_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fedsynth-verify ")


def test_pki_command_writes_ca_server_and_site_keys(tmp_path):
    got = CliRunner().invoke(cli.app, ["pki", str(tmp_path / "pki"), "site-a", "site-b",
                                       "--host", "coord.example.org"])
    assert got.exit_code == 0, got.output
    for name in ("ca.crt", "ca.key", "server.pem", "server.key", "site-a", "site-a.pub", "site-b"):
        assert (tmp_path / "pki" / name).is_file(), name
    assert stat.S_IMODE(os.stat(tmp_path / "pki" / "ca.key").st_mode) == 0o600
    bad = CliRunner().invoke(cli.app, ["pki", str(tmp_path / "pki2"), "../etc"])
    assert bad.exit_code == 2


def _fake_flwr(run_dir, status):
    """Stands in for `flwr run --stream`: the ServerApp writes its summary, then flwr exits 0."""
    calls = []

    def run_command(cmd, *, env, what, **kw):
        calls.append(cmd)
        out = run_dir / "r1"
        out.mkdir(parents=True, exist_ok=True)
        (out / "consortium-summary.json").write_text(json.dumps({"status": status, "rounds": []}))

    return calls, run_command


def test_run_exits_nonzero_when_the_run_failed(tmp_path, monkeypatch):
    calls, fake = _fake_flwr(tmp_path, "failed: no site's update was aggregated in 3 rounds (declined 9)")
    monkeypatch.setattr(cli, "run_command", fake)
    got = CliRunner().invoke(cli.app, ["run", "/opt/fedsynth", "hosp", "--run-name", "r1",
                                       "--run-config", "num-rounds=3 secagg=true", "--run-dir", str(tmp_path)])
    assert got.exit_code == RunFailedError.exit_code == 11, got.output
    assert "no site's update was aggregated" in got.output
    cmd = calls[0]
    assert cmd[1:6] == ["run", "/opt/fedsynth", "hosp", "--stream", "--run-config"]
    assert 'run-name="r1"' in cmd[6] and "secagg=true" in cmd[6]


def test_run_exits_zero_when_completed_and_refuses_a_stale_summary(tmp_path, monkeypatch):
    _, fake = _fake_flwr(tmp_path, "completed")
    monkeypatch.setattr(cli, "run_command", fake)
    args = ["run", "/opt/fedsynth", "hosp", "--run-name", "r1", "--run-dir", str(tmp_path)]
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    monkeypatch.setattr(cli, "run_command", lambda *a, **k: None)  # flwr wrote nothing this time
    old = tmp_path / "r1" / "consortium-summary.json"
    os.utime(old, (1, 1))
    got = CliRunner().invoke(cli.app, args)
    assert got.exit_code == 1 and "wrote no consortium summary" in got.output


def test_help_documents_exit_codes():
    from client.cli import app as site_app

    for app in (cli.app, site_app):
        out = CliRunner().invoke(app, ["--help"], terminal_width=200).output
        assert "Exit codes:" in out and "2 settings/usage" in out
    assert "11 the run failed" in CliRunner().invoke(cli.app, ["--help"], terminal_width=200).output


def test_keygen_writes_the_coordinator_key_and_refuses_to_overwrite(tmp_path):
    key = tmp_path / "coordinator.key"
    first = CliRunner().invoke(cli.app, ["keygen", str(key)])
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and "key id:" in first.output
    before = key.read_bytes()
    again = CliRunner().invoke(cli.app, ["keygen", str(key)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output and "Traceback" not in again.output
    assert key.read_bytes() == before


def test_run_usage_errors_exit_2_before_flwr_is_called(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(cli, "run_command", lambda *a, **k: called.append(a))
    monkeypatch.delenv("FEDSYNTH_COORD_RUN_DIR", raising=False)
    no_dir = CliRunner().invoke(cli.app, ["run", "/opt/fedsynth", "hosp", "--run-name", "r1"])
    assert no_dir.exit_code == 2 and "FEDSYNTH_COORD_RUN_DIR" in no_dir.output
    twice = CliRunner().invoke(cli.app, ["run", "/opt/fedsynth", "hosp", "--run-name", "r1",
                                         "--run-config", "run-name=r2", "--run-dir", str(tmp_path)])
    assert twice.exit_code == 2 and "--run-name" in twice.output
    assert called == [] and "Traceback" not in no_dir.output + twice.output


def test_pki_refuses_a_bad_host_with_a_clear_error(tmp_path):
    got = CliRunner().invoke(cli.app, ["pki", str(tmp_path / "pki"), "site-a", "--host", "bad host"])
    assert got.exit_code == 2 and "error:" in got.output and "Traceback" not in got.output
    assert not (tmp_path / "pki" / "ca.key").exists()
