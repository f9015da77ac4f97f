import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.audit import GENESIS, AuditLog, entry_hash, last_hash, validate_data, verify_log
from shared.errors import InputError, VerificationError
from shared.signing import canonical_json, generate_key, load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keys(tmp_path):
    out = {}
    for name in ("site-a", "site-b"):
        generate_key(tmp_path / "keys" / f"{name}.key")
        out[name] = load_private_key(tmp_path / "keys" / f"{name}.key")
    return out


@pytest.fixture
def pubs(tmp_path, keys):
    return {n: load_public_key(tmp_path / "keys" / f"{n}.key.pub") for n in keys}


def write_log(path, key, n=5, actor="site-a"):
    log = AuditLog(path, key=key, actor=actor)
    log.append("run_start", {"run_id": "run-1"})
    log.append("config", {"config_hash": "ab" * 32})
    for r in range(n - 3):
        log.append("round", {"round": r, "epsilon": 0.5 * (r + 1), "metrics": {"privacy.mia_auc": 0.51}})
    log.append("update_rejected", {"round": n, "reason": "norm bound exceeded"})
    return log


def test_append_chain_and_verify(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=6)
    lines = path.read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == list(range(6))
    assert entries[0]["prev"] == GENESIS
    for a, b in zip(entries, entries[1:], strict=False):
        assert b["prev"] == a["hash"]
    # known answer: hash is sha256 over the canonical entry without hash/sig
    body = {k: v for k, v in entries[2].items() if k not in ("hash", "sig")}
    assert entries[2]["hash"] == hashlib.sha256(canonical_json(body)).hexdigest() == entry_hash(entries[2])
    assert entries[0]["time"].endswith("Z") and entries[0]["actor"] == "site-a"
    assert verify_log(path, pubs) == 6
    assert last_hash(path) == entries[-1]["hash"]
    # reopening continues the chain
    AuditLog(path, key=keys["site-a"], actor="site-a").append("run_end", {"rounds": 3})
    assert verify_log(path, pubs) == 7


def _line_of(data: bytes, pos: int) -> int:
    return data[:pos].count(b"\n") + 1


def test_flipping_any_byte_names_the_entry_and_line(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=4)
    original = path.read_bytes()
    # every third byte (plus every newline): all fields of every entry, fast enough for the default run
    positions = sorted(set(range(0, len(original), 3)) | {i for i, b in enumerate(original) if b == 10})
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(VerificationError) as exc:
            verify_log(path, pubs)
        problem = exc.value.problems[0]
        assert problem.where == str(path)
        assert problem.line == _line_of(original, pos), (pos, str(exc.value))
    path.write_bytes(original)
    assert verify_log(path, pubs) == 4


@pytest.mark.parametrize("field,reason", [
    ("data", "bad hash"), ("prev", "broken chain"), ("sig", "signature"), ("seq", "expected seq"),
    ("key_id", "bad hash"), ("time", "bad hash"),
])
def test_edited_field_reasons(tmp_path, keys, pubs, field, reason):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=5)
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[2])
    entry[field] = {
        "data": {"round": 0, "epsilon": 0.1, "metrics": {"privacy.mia_auc": 0.51}},
        "prev": "1" * 64, "sig": entry["sig"][::-1], "seq": 7, "key_id": "0" * 16,
        "time": "2020-01-01T00:00:00.000000Z",
    }[field]
    lines[2] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(VerificationError, match=reason) as exc:
        verify_log(path, pubs)
    assert exc.value.problems[0].line == 3 and "seq=" in str(exc.value)


def test_deleting_or_reordering_names_first_bad_entry(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=6)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))  # delete seq 2
    with pytest.raises(VerificationError, match="expected seq 2") as exc:
        verify_log(path, pubs)
    assert exc.value.problems[0].line == 3 and "seq=3" in str(exc.value)
    path.write_bytes(b"".join(lines[1:]))  # delete the first entry
    with pytest.raises(VerificationError, match="expected seq 0"):
        verify_log(path, pubs)
    path.write_bytes(b"".join([lines[0], lines[1], lines[3], lines[2], *lines[4:]]))  # swap 2 and 3
    with pytest.raises(VerificationError, match="expected seq 2") as exc:
        verify_log(path, pubs)
    assert exc.value.problems[0].line == 3


def test_signer_must_be_the_actor(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-b"], actor="site-a")  # site-b's key writing as site-a
    with pytest.raises(VerificationError, match="actor 'site-a' but signed with the key of 'site-b'"):
        verify_log(path, pubs)
    with pytest.raises(VerificationError, match="unknown key"):
        verify_log(path, {"site-a": pubs["site-a"]})


def test_unsigned_log_needs_opt_in(tmp_path, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, None)
    with pytest.raises(VerificationError, match="not signed"):
        verify_log(path, pubs)
    assert verify_log(path, pubs, allow_unsigned=True) == 5


def test_validate_data_refuses_free_text_and_bad_values():
    assert validate_data("round", {"round": 1, "eps": 1.5, "codes": ["F32.1"], "m": {"a": 1.0}}) == []
    problems = validate_data("chat", {"text": "x" * 500, "nested": {"a": {"b": 1}}, "nan": float("nan"),
                                      "bad key!": 1, "line": "a\nb"})
    wheres = {p.where for p in problems}
    assert {"kind", "data.text", "data.nested.a", "data.nan", "data.bad key!", "data.line"} <= wheres
    assert any(p.where == "data.reason" for p in validate_data("update_rejected", {"round": 1}))
    log_problems = validate_data("config", {})
    assert log_problems and log_problems[0].where == "data.config_hash"


def test_append_refuses_invalid_entry(tmp_path, keys):
    log = AuditLog(tmp_path / "audit.jsonl", key=keys["site-a"], actor="site-a")
    with pytest.raises(InputError, match="refusing audit entry"):
        log.append("round", {"note": "patient John Doe said " + "x" * 300})
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_torn_last_line_is_moved_aside(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=4)
    good = path.read_bytes()
    torn = b'{"actor":"site-a","data":{"round":9'
    path.write_bytes(good + torn)
    with pytest.raises(VerificationError, match="torn last line"):
        verify_log(path, pubs)
    AuditLog(path, key=keys["site-a"], actor="site-a").append("run_end", {"rounds": 1})
    assert verify_log(path, pubs) == 5
    aside = list(tmp_path.glob("audit.jsonl.torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn
    assert path.read_bytes().startswith(good)



def test_a_complete_but_damaged_last_line_is_refused_not_set_aside(tmp_path, keys):
    # Adversary: an operator edits the last entry (say, to blur an epsilon) and saves the file.
    # A crash only ever leaves a line without its newline, so this is not repaired quietly.
    path = tmp_path / "audit.jsonl"
    write_log(path, keys["site-a"], n=3)
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = lines[-1].replace(b'"actor"', b'"actor', 1)
    path.write_bytes(b"".join(lines[:-1]) + damaged)
    before = path.read_bytes()
    with pytest.raises(InputError, match="complete but not a valid entry") as err:
        AuditLog(path, key=keys["site-a"], actor="site-a").append("run_end", {"rounds": 1})
    assert (err.value.problems[0].where, err.value.problems[0].line) == (str(path), 3)
    assert path.read_bytes() == before and not list(tmp_path.glob("audit.jsonl.torn-*"))

WRITER = """
import sys
from pathlib import Path
from shared.audit import AuditLog
from shared.signing import load_private_key
log = AuditLog(Path(sys.argv[1]), key=load_private_key(Path(sys.argv[2])), actor=sys.argv[3])
n = int(sys.argv[4])
i = 0
while n < 0 or i < n:
    log.append("round", {"round": i, "epsilon": 0.01 * i})
    i += 1
"""


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-c", WRITER, *map(str, args)], cwd=ROOT)


def test_kill_9_during_appends_keeps_chain_valid(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    proc = _spawn(path, tmp_path / "keys" / "site-a.key", "site-a", -1)
    try:
        deadline = time.monotonic() + 120
        while (not path.exists() or path.read_bytes().count(b"\n") < 30) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # whatever the kill left (at most a torn tail), the next writer continues a valid chain ...
    log = AuditLog(path, key=keys["site-a"], actor="site-a")
    log.append("run_end", {"killed": True})
    n = verify_log(path, pubs)
    assert n >= 31
    # ... and a tail torn mid-write (what a power cut leaves) is moved aside, never breaking the chain
    with open(path, "ab") as f:
        f.write(b'{"actor":"site-a","data":{"epsilon":0.')
    AuditLog(path, key=keys["site-a"], actor="site-a").append("run_start", {"run_id": "again"})
    assert verify_log(path, pubs) == n + 1


def test_concurrent_writers_interleave_whole_entries(tmp_path, keys, pubs):
    path = tmp_path / "audit.jsonl"
    procs = [_spawn(path, tmp_path / "keys" / f"{n}.key", n, 40) for n in ("site-a", "site-b")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert verify_log(path, pubs) == 80
    actors = [json.loads(line)["actor"] for line in path.read_bytes().splitlines()]
    assert actors.count("site-a") == actors.count("site-b") == 40


def test_audit_log_is_owner_only_even_under_a_lax_umask(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        log = AuditLog(tmp_path / "audit.jsonl", actor="site-a")
        log.append("run_start", {"run": "r"})
        assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
        legacy = tmp_path / "old.jsonl"
        legacy.touch(mode=0o644)
        os.chmod(legacy, 0o644)
        AuditLog(legacy, actor="site-a").append("run_start", {"run": "r"})
        assert stat.S_IMODE(os.stat(legacy).st_mode) == 0o600  # an existing 0644 log is tightened
    finally:
        os.umask(old)
