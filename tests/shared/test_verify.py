import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.signing import canonical_json, sign_file
from tests.shared.reports import key_args, run

ROOT = Path(__file__).resolve().parents[2]
def test_everything_verifies(bundle, capsys):
    code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 0, out
    # 4 site reports + 2 site logs + consortium report + coordinator log + adapter, then
    # 3 audit trails matched + 1 checkpoint list matched
    assert sum(line.startswith("OK ") for line in out.splitlines()) == 13
    assert "summary: 13 ok, 0 failed, 0 unreadable" in out
    assert "audit log valid: 5 entries" in out
    assert "audit trail matches: 2 report(s) issued by site-a" in out
    assert "1 checkpoint(s) match their sha256" in out
    assert "site report site-b round 1: schema valid, signed by site-b" in out
    assert "README" not in out
    code, out, _ = run(capsys, bundle["dir"], "--keys-dir", bundle["keys"])
    assert code == 0, out


def _flip(path: Path, pos: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos % len(data)] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel,pos,reason", [
    ("site-a/report-round-2.json", 10, "hash mismatch"),
    ("site-a/report-round-2.json", -3, "hash mismatch"),
    ("site-a/report-round-2.json.sig", 60, ""),
    ("site-a/report-round-2.json.sig", -5, ""),
    ("coordinator/consortium.json", 200, "hash mismatch"),
    ("coordinator/adapter.safetensors", 7, "hash mismatch"),
    ("site-b/audit.jsonl", 30, "line 1"),
    ("coordinator/coordinator.audit.jsonl", -20, "line 3"),
])
def test_a_flipped_byte_fails_naming_file_and_place(bundle, capsys, rel, pos, reason):
    target = bundle["dir"] / rel
    _flip(target, pos)
    code, out, err = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 1
    fail_lines = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail_lines) == 1, out
    assert str(bundle["dir"] / rel.removesuffix(".sig")) in fail_lines[0] and reason in fail_lines[0]
    assert "Traceback" not in out + err


def test_deleted_audit_entry_names_first_bad_entry(bundle, capsys):
    log = bundle["dir"] / "site-a" / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[2])
    code, out, _ = run(capsys, log, *key_args(bundle))
    assert code == 1
    assert f"FAIL       {log}: line 2: entry seq=2: expected seq 1" in out


def test_report_signed_by_another_site_fails(bundle, capsys):
    path = bundle["dir"] / "site-a" / "report-round-1.json"
    sign_file(path, bundle["private"]["site-b"])
    code, out, _ = run(capsys, path, *key_args(bundle))
    assert code == 1 and "signed by 'site-b', not by 'site-a'" in out
    code, out, _ = run(capsys, path, *key_args(bundle, ("site-a", "coordinator")))
    assert code == 1 and "unknown key" in out
    consortium = bundle["dir"] / "coordinator" / "consortium.json"
    sign_file(consortium, bundle["private"]["site-a"])
    code, out, _ = run(capsys, consortium, *key_args(bundle))
    assert code == 1 and "signed by 'site-a', not by 'coordinator'" in out


def test_unsigned_or_schema_invalid_reports_fail(bundle, capsys):
    path = bundle["dir"] / "site-a" / "report-round-1.json"
    (bundle["dir"] / "site-a" / "report-round-1.json.sig").unlink()
    code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
    assert code == 1 and "report is not signed" in out
    data = json.loads(path.read_text())
    data["privacy"]["epsilon"] = "lots"
    path.write_bytes(canonical_json(data))
    sign_file(path, bundle["private"]["site-a"])  # correctly signed, but not a valid report
    code, out, _ = run(capsys, path, *key_args(bundle))
    assert code == 1 and "does not match its schema" in out and "privacy.epsilon" in out


def test_usage_and_unreadable_exit_codes(bundle, capsys, tmp_path):
    assert run(capsys, bundle["dir"])[0] == 2  # no keys
    code, _, err = run(capsys, bundle["dir"], "--key", "site-a")
    assert code == 2 and "NAME=PUBKEY" in err
    code, _, err = run(capsys, bundle["dir"], "--key", f"site-a={tmp_path / 'missing.pub'}")
    assert code == 2 and "missing.pub" in err
    code, _, _ = run(capsys, bundle["dir"], "--key", f"a={bundle['keys'] / 'site-a.key.pub'}",
                     "--key", f"b={bundle['keys'] / 'site-a.key.pub'}")
    assert code == 2
    assert run(capsys, "--help")[0] == 0
    assert run(capsys)[0] == 2
    code, out, _ = run(capsys, tmp_path / "nope", *key_args(bundle))
    assert code == 3 and "does not exist" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, empty, *key_args(bundle))[0] == 3
    unreadable = bundle["dir"] / "site-b" / "audit.jsonl"
    unreadable.chmod(0)
    try:
        readable = _can_read(unreadable)
        code, out, _ = run(capsys, bundle["dir"], *key_args(bundle))
        assert code == (0 if readable else 3)  # root reads anything
    finally:
        unreadable.chmod(0o644)


def _can_read(path: Path) -> bool:
    try:
        path.read_bytes()
        return True
    except OSError:
        return False


BLOCKED_MAIN = (
    "import sys; sys.modules['client'] = None; sys.modules['server'] = None; "
    "import shared.report_html; from shared.verify import main; raise SystemExit(main())"
)


def test_console_entry_point_needs_only_shared_and_prints_no_traceback(bundle):
    _flip(bundle["dir"] / "site-a" / "audit.jsonl", 100)
    proc = subprocess.run(
        # client/ and server/ made unimportable: an auditor's verification needs only shared/
        [sys.executable, "-c", BLOCKED_MAIN, str(bundle["dir"]), "--keys-dir", str(bundle["keys"])],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
