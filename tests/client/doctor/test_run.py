"""``fedsynth-site doctor``: every broken prerequisite is reported with its fix; a healthy site passes.

Certificates are made here with ``cryptography`` (tests under tests/client do not
import server/). The coordinator check handshakes with a real local TLS server.
"""

import json
import os
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from client.demo.data import write_demo
from client.doctor import checks as doctor_checks
from client.doctor import federation as doctor_federation
from client.doctor import run as doctor
from client.doctor import site as doctor_site
from client.model import tiny_random_model
from shared.settings import SiteSettings
from shared.signing import generate_key

NO_GPU = not torch.cuda.is_available()


# --------------------------------------------------------------------------- fixtures


def _cert(subject: str, key, issuer_key, issuer: str, *, ca: bool, start: datetime, days: float,
          sans=()) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC) - timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, ca_key, "test CA", ca=True, start=now, days=365)
    server_key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    server = _cert("localhost", server_key, ca_key, "test CA", ca=False, start=now, days=30,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (d / "ca.crt").write_bytes(_pem(ca))
    (d / "server.pem").write_bytes(_pem(server))
    _write_private(d / "server.key", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    expired = _cert("old CA", ca_key, ca_key, "old CA", ca=True, start=now - timedelta(days=400), days=30)
    (d / "expired-ca.crt").write_bytes(_pem(expired))
    site_key = ec.generate_private_key(ec.SECP384R1())
    _write_private(d / "site-a", site_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    (d / "site-a.pub").write_bytes(site_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" site-a\n")
    ed = ed25519.Ed25519PrivateKey.generate()
    _write_private(d / "ed25519-key", ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other CA", other_ca_key, other_ca_key, "other CA", ca=True, start=now, days=365)
    (d / "other-ca.crt").write_bytes(_pem(other))
    return {p.name: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def tls_server(pki):
    """A TLS listener on 127.0.0.1 presenting server.pem; yields 'host:port'."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                conn.settimeout(5)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"localhost:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("site")
    model, tokenizer = tiny_random_model("llama")
    model.save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    write_demo(d / "demo", patients_per_site=20, public_reports=100)
    notes = d / "demo" / "site-a" / "notes.jsonl"
    notes.chmod(0o640)
    generate_key(d / "keys" / "site-a.key")  # named after the site: auditors name keys by file
    return {"dir": d, "model": d / "model", "notes": notes, "signing": d / "keys" / "site-a.key"}


def _settings(site, tmp_path: Path, **overrides) -> SiteSettings:
    values = {"site_id": "site-a", "notes_path": site["notes"], "model_dir": site["model"],
              "output_dir": tmp_path / "output", "signing_key": site["signing"], "device": "auto",
              "require_secagg": True}
    return SiteSettings(**(values | overrides))


def _by_name(checks: list[doctor_checks.Check]) -> dict[str, doctor_checks.Check]:
    return {c.name: c for c in checks}


def _failed(checks: list[doctor_checks.Check]) -> dict[str, doctor_checks.Check]:
    return {c.name: c for c in checks if not c.ok}


# --------------------------------------------------------------------------- healthy


def pinned_release(tmp_path: Path) -> tuple[Path, Path]:
    """A minimal app tree and the launcher's pin of it."""
    from client.bundle_trust import write_pin

    app = tmp_path / "release"
    (app / "client").mkdir(parents=True)
    (app / "client" / "app.py").write_text("app = None\n")
    (app / "pyproject.toml").write_text('[project]\nname = "fedsynth"\nversion = "0.1.0"\n\n'
                                        '[tool.flwr.app]\npublisher = "fedsynth"\n\n'
                                        '[tool.flwr.app.components]\nserverapp = "server.app:app"\n'
                                        'clientapp = "client.app:app"\n\n[tool.flwr.app.config]\n'
                                        'num-rounds = 1\n')
    write_pin(app, tmp_path / "pin.json")
    return app, tmp_path / "pin.json"


def test_healthy_site_passes_every_check(site, pki, tls_server, tmp_path):
    app, pin = pinned_release(tmp_path)
    checks = doctor.run_doctor(_settings(site, tmp_path), coordinator=tls_server,
                               root_cert=pki["ca.crt"], auth_key=pki["site-a"], min_free_gb=0.001,
                               pin=pin, install_dir=app, deploy_site_id="site-a",
                               configured_site_id="site-a")
    assert _failed(checks) == {}
    named = _by_name(checks)
    assert set(named) == {"GPU / CUDA", "model", "notes", "root CA", "SuperNode key", "signing key",
                          "site identity", "release pin",
                          "secure aggregation", "coordinator", "privacy ledger", "disk space"}
    assert "llama" in named["model"].detail
    assert "patients" in named["notes"].detail
    assert "TLS" in named["coordinator"].detail
    # Everything a real deployment needs is present: only a CPU-only host is a warning.
    warned = {c.name for c in checks if c.warning}
    assert warned <= ({"GPU / CUDA"} if NO_GPU else set())
    assert (tmp_path / "output" / "privacy-ledger.jsonl").is_file()


@pytest.mark.skipif(not NO_GPU, reason="CPU-only behaviour")
def test_cpu_only_host_is_a_warning_for_auto_and_a_failure_for_cuda(site, tmp_path):
    for device in ("auto", "cpu"):
        check = doctor_site.check_gpu(_settings(site, tmp_path, device=device))
        assert check.ok and check.warning and "no CUDA device" in check.detail
    check = doctor_site.check_gpu(_settings(site, tmp_path, device="cuda"))
    assert not check.ok and "FEDSYNTH_SITE_DEVICE=cpu" in check.fix


# --------------------------------------------------------------------------- model


def test_missing_model_dir_is_reported_with_fix(site, tmp_path):
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=tmp_path / "nope"))
    assert not check.ok and "does not exist" in check.detail and "stage the weights" in check.fix


def test_model_dir_without_weights_or_with_lfs_pointers_fails(site, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (incomplete / f).write_bytes((site["model"] / f).read_bytes())
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=incomplete))
    assert not check.ok and "missing weights" in check.detail
    (incomplete / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=incomplete))
    assert not check.ok and "git-lfs pointer" in check.detail


def test_missing_shard_in_index_fails(site, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in site["model"].iterdir():
        (sharded / f.name).write_bytes(f.read_bytes())
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=sharded))
    assert not check.ok and "model-00002-of-00002.safetensors" in check.detail


def test_embedded_model_shipped_installed_or_to_build(site, tmp_path, monkeypatch):
    from client import pretrain
    from shared.signing import sha256_file as file_sha256

    monkeypatch.setenv("FEDSYNTH_CACHE_DIR", str(tmp_path / "cache"))
    # Not installed, but shipped for the current recipe: fine, copied on first use.
    monkeypatch.setattr(pretrain, "shipped_matches", lambda seed=0: True)
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=None))
    assert check.ok and not check.warning and "shipped" in check.detail
    # A recipe the shipped model is not: a build is due, a warning with the command.
    monkeypatch.setattr(pretrain, "shipped_matches", lambda seed=0: False)
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=None))
    assert check.ok and check.warning and "build-model" in check.fix
    built = pretrain.cached_model_dir()
    assert built.parent == tmp_path / "cache"
    built.mkdir(parents=True)
    (built / "model.safetensors").write_bytes(b"weights")
    (built / "BUILD.json").write_text(json.dumps({"weights_sha256": file_sha256(built / "model.safetensors")}))
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=None))
    assert check.ok and not check.warning and str(built) in check.detail
    # Weights swapped after the build: a failure naming the file, never "ok".
    (built / "model.safetensors").write_bytes(b"other weights")
    check = doctor_site.check_model(_settings(site, tmp_path, model_dir=None))
    assert not check.ok and "model.safetensors" in check.detail and "does not match" in check.detail


# --------------------------------------------------------------------------- notes


def test_bad_notes_line_is_reported_with_its_line_number(site, tmp_path):
    bad = tmp_path / "notes.jsonl"
    lines = site["notes"].read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"note_id": "x", "patient_id": "p", "icd10": "Q99.9"'] + lines[3:]) + "\n")
    check = doctor_site.check_notes(_settings(site, tmp_path, notes_path=bad))
    assert not check.ok and f"{bad}:4" in check.detail and "fedsynth-site validate" in check.fix
    skipped = doctor_site.check_notes(_settings(site, tmp_path, notes_path=bad, notes_mode="skip"))
    assert skipped.ok and skipped.warning and "1 bad line" in skipped.detail


def test_missing_notes_file_and_delta_above_one_over_n_fail(site, tmp_path):
    assert not doctor_site.check_notes(_settings(site, tmp_path, notes_path=tmp_path / "none.jsonl")).ok
    check = doctor_site.check_notes(_settings(site, tmp_path, delta=0.5))
    assert not check.ok and "FEDSYNTH_SITE_DELTA" in check.fix


def test_world_readable_notes_are_a_warning(site, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(site["notes"].read_bytes())
    notes.chmod(0o644)
    check = doctor_site.check_notes(_settings(site, tmp_path, notes_path=notes))
    assert check.ok and check.warning and "chmod o-rwx" in check.fix


# --------------------------------------------------------------------------- certificates and keys


def test_expired_absent_or_non_ca_root_cert_fails(pki, tmp_path):
    expired = doctor_federation.check_root_cert(pki["expired-ca.crt"])
    assert not expired.ok and "expired" in expired.detail and "ca.crt" in expired.fix
    absent = doctor_federation.check_root_cert(tmp_path / "ca.crt")
    assert not absent.ok and "fedsynth-coordinator pki" in absent.fix
    not_ca = doctor_federation.check_root_cert(pki["server.pem"])
    assert not not_ca.ok and "not a CA" in not_ca.detail
    soon = doctor_federation.check_root_cert(pki["ca.crt"], now=datetime.now(UTC) + timedelta(days=350))
    assert soon.ok and soon.warning
    assert doctor_federation.check_root_cert(pki["ca.crt"]).ok


def test_auth_key_with_0644_permissions_fails_with_chmod(pki, tmp_path):
    key = tmp_path / "site-a"
    key.write_bytes(pki["site-a"].read_bytes())
    key.chmod(0o644)
    check = doctor_federation.check_auth_key(key)
    assert not check.ok and "0644" in check.detail and f"chmod 600 {key}" in check.fix
    key.chmod(0o600)
    assert doctor_federation.check_auth_key(key).ok


def test_auth_key_of_wrong_kind_or_mismatched_pub_fails(pki, tmp_path):
    wrong = doctor_federation.check_auth_key(pki["ed25519-key"])
    assert not wrong.ok and "ECDSA" in wrong.detail and "ssh-keygen -t ecdsa" in wrong.fix
    assert not doctor_federation.check_auth_key(tmp_path / "absent").ok
    key = _write_private(tmp_path / "k", pki["site-a"].read_bytes())
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "k.pub").write_bytes(other.public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH))
    mismatch = doctor_federation.check_auth_key(key)
    assert not mismatch.ok and "does not match" in mismatch.detail


def test_signing_key_permissions_and_absence(site, tmp_path):
    key = tmp_path / "signing"
    key.write_bytes(site["signing"].read_bytes())
    key.chmod(0o644)
    check = doctor_federation.check_signing_key(_settings(site, tmp_path, signing_key=key))
    assert not check.ok and f"chmod 600 {key}" in check.fix
    unsigned = doctor_federation.check_signing_key(_settings(site, tmp_path, signing_key=None))
    assert unsigned.ok and unsigned.warning and "FEDSYNTH_SITE_SIGNING_KEY" in unsigned.fix


# --------------------------------------------------------------------------- coordinator


def test_secagg_policy_is_reported_and_plain_rounds_allowed_is_a_warning(site, tmp_path):
    required = doctor_federation.check_secagg(_settings(site, tmp_path))
    assert required.ok and not required.warning and "REQUIRE_SECAGG=true" in required.detail
    allowed = doctor_federation.check_secagg(_settings(site, tmp_path, require_secagg=False))
    assert allowed.ok and allowed.warning and "in the clear" in allowed.detail
    assert "FEDSYNTH_SITE_REQUIRE_SECAGG=true" in allowed.fix


def test_unreachable_coordinator_port_is_reported(pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    check = doctor_federation.check_coordinator(f"127.0.0.1:{port}", pki["ca.crt"], timeout=2)
    assert not check.ok and "refused" in check.detail and "SuperLink" in check.fix


def test_coordinator_with_certificate_from_another_ca_is_not_trusted(pki, tls_server):
    check = doctor_federation.check_coordinator(tls_server, pki["other-ca.crt"], timeout=5)
    assert not check.ok and "not trusted" in check.detail and "ca.crt" in check.fix
    assert not doctor_federation.check_coordinator("no-port", pki["ca.crt"]).ok
    assert not doctor_federation.check_coordinator(tls_server, None).ok


# --------------------------------------------------------------------------- ledger and disk


def test_unwritable_ledger_dir_is_reported(site, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the ledger's directory should be")
    check = doctor_site.check_ledger(_settings(site, tmp_path, ledger_path=blocker / "ledger.jsonl"))
    assert not check.ok and "not a directory" in check.detail and "FEDSYNTH_SITE_LEDGER_PATH" in check.fix


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_ledger_dir_is_reported(site, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        check = doctor_site.check_ledger(_settings(site, tmp_path, ledger_path=locked / "ledger.jsonl"))
    finally:
        locked.chmod(0o700)
    assert not check.ok and "not writable" in check.detail


def test_corrupt_ledger_is_reported(site, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("not json\n{}\n")  # a bad line before the last: corruption, not a torn tail
    check = doctor_site.check_ledger(_settings(site, tmp_path, ledger_path=ledger))
    assert not check.ok and "never an older one" in check.fix


@pytest.mark.skipif(doctor_site._fs_type(Path("/dev/shm")) != "tmpfs", reason="no tmpfs at /dev/shm")
def test_ledger_on_tmpfs_fails(site, tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        check = doctor_site.check_ledger(_settings(site, tmp_path, ledger_path=Path(d) / "ledger.jsonl"))
    assert not check.ok and "memory file system" in check.detail


def test_low_disk_threshold_fails(site, tmp_path):
    check = doctor_site.check_disk(_settings(site, tmp_path), min_free_gb=1e9)
    assert not check.ok and "FEDSYNTH_SITE_OUTPUT_DIR" in check.fix
    assert doctor_site.check_disk(_settings(site, tmp_path), min_free_gb=0.001).ok


# --------------------------------------------------------------------------- command


def _app() -> typer.Typer:
    from shared.cli_errors import expected_errors

    app = typer.Typer()
    app.command("doctor")(expected_errors(doctor.doctor_command))
    app.command("noop")(lambda: None)  # two commands: typer then dispatches by name
    return app


def test_doctor_command_exit_codes(site, pki, tls_server, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.jsonl").write_bytes(site["notes"].read_bytes())
    for key, value in {"MODEL_DIR": site["model"], "SIGNING_KEY": site["signing"],
                       "REQUIRE_SECAGG": "true"}.items():
        monkeypatch.setenv(f"FEDSYNTH_SITE_{key}", str(value))
    app, pin = pinned_release(tmp_path)
    monkeypatch.setenv("FEDSYNTH_PIN", str(pin))
    monkeypatch.setenv("FEDSYNTH_INSTALL_DIR", str(app))
    args = ["doctor", "--data-dir", str(data), "--site-id", "site-a", "--min-free-gb", "0.001",
            "--coordinator", tls_server, "--root-cert", str(pki["ca.crt"]), "--auth-key", str(pki["site-a"])]
    runner = CliRunner()
    ok = runner.invoke(_app(), args, terminal_width=200)
    assert ok.exit_code == 0, ok.output
    assert "all checks passed" in ok.output and "secure aggregation" in ok.output
    assert (data / "output" / "privacy-ledger.jsonl").is_file()  # node config data-dir applied
    broken = runner.invoke(_app(), [*args[:-1], str(pki["ed25519-key"])], terminal_width=200)
    assert broken.exit_code == 1 and "SuperNode key" in broken.output and "FAIL" in broken.output
    monkeypatch.setenv("FEDSYNTH_SITE_DEVICE", "tpu")
    bad_settings = runner.invoke(_app(), args, terminal_width=200)
    assert bad_settings.exit_code == 1 and "FEDSYNTH_SITE_DEVICE" in bad_settings.output


def test_pin_must_match_the_installed_tree(tmp_path):
    from client.doctor.deploy import check_pin

    app, pin = pinned_release(tmp_path)
    assert check_pin(pin, app).ok
    (app / "client" / "app.py").write_text("app = 'edited'\n")  # an operator edits the release
    edited = check_pin(pin, app)
    assert not edited.ok and "pins fedsynth 0.1.0" in edited.detail
    assert not check_pin(None, app).ok
    (tmp_path / "bad.json").write_text("{}")
    assert not check_pin(tmp_path / "bad.json", app).ok


def test_site_identity_names_every_mismatch(site, tmp_path):
    from client.doctor.deploy import check_site_identity
    from shared.audit import AuditLog
    from shared.signing import load_private_key

    settings = _settings(site, tmp_path)
    assert check_site_identity(settings, "site-a", "site-a").ok
    wrong_id = check_site_identity(settings, "site-a", "site-b")
    assert not wrong_id.ok and "FEDSYNTH_SITE_SITE_ID=site-b" in wrong_id.detail
    generic = tmp_path / "signing"
    generate_key(generic)
    misnamed = check_site_identity(_settings(site, tmp_path, signing_key=generic), "site-a", None)
    assert not misnamed.ok and "site-a.key" in misnamed.fix
    # the audit log was signed by another key (e.g. a regenerated one)
    other = tmp_path / "other" / "site-a.key"
    generate_key(other)
    (tmp_path / "output").mkdir(exist_ok=True)
    AuditLog(tmp_path / "output" / "audit.jsonl", key=load_private_key(other), actor="site-a").append(
        "run_start", {"run": "r"})
    foreign = check_site_identity(settings, "site-a", "site-a")
    assert not foreign.ok and "was written by key" in foreign.detail


def test_supernode_key_of_another_account_is_a_warning_not_a_failure(pki, monkeypatch):
    # the SuperNode runs as fedsynth-net; doctor runs as fedsynth and cannot read its key
    key = pki["site-a"]
    real = Path.read_bytes

    def denied(self):
        if self == key:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    monkeypatch.setattr(doctor_federation.os, "geteuid", lambda: os.stat(key).st_uid + 4242)
    check = doctor_federation.check_auth_key(key)
    assert check.ok and check.warning and "sudo -u" in check.fix
    key.chmod(0o640)  # readable by a group but not by us: that is a finding, not intended
    try:
        assert not doctor_federation.check_auth_key(key).ok
    finally:
        key.chmod(0o600)
