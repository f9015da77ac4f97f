"""The privacy ledger cannot be lowered silently: an operator editing files plays the adversary.

Issue #12 §2's table, one test per tamper case: starting from a 3-round ledger,
each of these used to give a lower ε with no error. Now every one stops
training with a LedgerError naming what disagrees, and ε never goes down.
"""

import hashlib
import json
import shutil
from datetime import UTC, datetime

import pytest

from client.dp.ledger import Ledger, compute_epsilon
from client.dp.ledger_anchor import open_site_ledger
from client.dp.ledger_recovery import recover_ledger, rotate_key, site_audit_log
from client.privacy_report import ledger_privacy, write_site_report
from shared.audit import verify_log
from shared.errors import BudgetExceededError, LedgerError
from shared.report import ModelInfo, SiteRoundReport
from shared.report_io import software_versions
from shared.settings import SiteSettings, load_settings
from shared.signing import generate_key, load_public_key

DELTA = 1e-5
RUNS = [(0.8, 0.05, 60), (0.9, 0.05, 60), (0.85, 0.05, 60)]  # distinct (sigma, q): three rounds
CEILING = 15.0


def _settings(tmp_path, **kw) -> SiteSettings:
    key = tmp_path / "keys" / "site-a.key"
    if not key.exists():
        generate_key(key)
    return load_settings(SiteSettings, site_id="site-a", output_dir=tmp_path / "out",
                         signing_key=key, epsilon_ceiling=CEILING, **kw)


def _open(settings) -> Ledger:
    """What every round does first (client.site.open_ledger, without importing torch)."""
    return open_site_ledger(settings, site_audit_log(settings))


def _reserve(ledger, i, sigma, q, steps, ceiling=CEILING):
    return ledger.reserve(round_id=str(i), noise_multiplier=sigma, sample_rate=q, steps=steps,
                          delta=DELTA, accountant="rdp", epsilon_ceiling=ceiling, noise_source="test")


def _eps(runs) -> float:
    return compute_epsilon(list(runs), delta=DELTA, accountant="rdp")


@pytest.fixture
def three_rounds(tmp_path):
    settings = _settings(tmp_path)
    ledger = _open(settings)
    for i, run in enumerate(RUNS, start=1):
        entry = _reserve(ledger, i, *run)
        ledger.mark_released(entry)
    eps = ledger.epsilon(delta=DELTA, accountant="rdp")
    assert eps == pytest.approx(_eps(RUNS)) and eps < CEILING
    return settings, ledger.path, eps


def _refused(settings, *needles):
    """Training is refused: opening the ledger raises, naming what disagrees."""
    with pytest.raises(LedgerError) as err:
        _open(settings)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


# ---- the tamper table ----------------------------------------------------------------------


def test_deleted_ledger_is_refused_and_recovered_without_lowering_epsilon(three_rounds):
    settings, path, eps = three_rounds
    path.unlink()
    _refused(settings, "is missing", "audit.jsonl entry", "anchors its record 6", "ledger recover")
    assert not path.exists()  # the check never re-creates an empty (zero-ε) ledger
    got = recover_ledger(settings)
    assert got.epsilon == pytest.approx(eps) and got.records == 6 and got.previous is None
    assert _open(settings).epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps)


def test_emptied_ledger_is_refused(three_rounds):
    settings, path, _ = three_rounds
    path.write_bytes(b"")
    _refused(settings, "holds 0 records but record 6 was confirmed", "audit.jsonl entry", "ledger recover")


def test_ledger_path_pointing_at_a_new_file_is_refused(three_rounds, tmp_path):
    settings, _, _ = three_rounds
    moved = _settings(tmp_path, ledger_path=tmp_path / "elsewhere" / "fresh.jsonl")
    _refused(moved, "fresh.jsonl is missing", "anchors its record 6")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "fresh.jsonl").write_bytes(b"")  # an empty file there is no better
    _refused(moved, "holds 0 records but record 6 was confirmed")


def test_cut_last_complete_line_is_refused_not_treated_as_torn(three_rounds):
    settings, path, _ = three_rounds
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:-1]))
    _refused(settings, "holds 5 records but record 6 was confirmed", "audit.jsonl entry")
    assert len(_lines(path)) == 5 and not list(path.parent.glob("*.torn-*"))


@pytest.mark.parametrize("line", [3, 6])  # a reserve in the middle, the complete last line
def test_flipped_byte_in_a_complete_entry_raises_and_is_never_set_aside(three_rounds, line):
    settings, path, eps = three_rounds
    lines = _lines(path)
    before = lines[line - 1]
    lines[line - 1] = b"\x7f" + before[1:]  # '{' -> DEL: no longer JSON at all
    path.write_bytes(b"".join(lines))
    _refused(settings, f"corrupt at line {line}")
    assert not list(path.parent.glob("*.torn-*")), "a complete, anchored entry was set aside as torn"
    assert path.read_bytes() == b"".join(lines)
    # ... and the 4th round the ceiling refused is still refused once the ledger is recovered.
    recover_ledger(settings)
    ledger = _open(settings)
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps)
    with pytest.raises(BudgetExceededError):
        _reserve(ledger, 4, 0.8, 0.05, 60 * 40)


def test_value_edit_in_a_middle_entry_fails_its_hash(three_rounds):
    settings, path, _ = three_rounds
    lines = _lines(path)
    lines[0] = lines[0].replace(b'"steps":60', b'"steps":6')
    path.write_bytes(b"".join(lines))
    _refused(settings, "corrupt at line 1", "hash mismatch")


def test_every_entry_edited_with_recomputed_hash_chain_fails_the_mac(three_rounds):
    settings, path, eps = three_rounds
    prev, out = "0" * 64, []
    for raw in _lines(path):
        rec = json.loads(raw)
        rec["steps"] = 1  # a much smaller spend ...
        rec["prev"] = prev  # ... with every plain checksum recomputed, as the attacker can
        body = {k: v for k, v in rec.items() if k not in ("hash", "mac")}
        rec["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        prev = rec["hash"]
        out.append(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    path.write_bytes(b"".join(out))
    msg = _refused(settings, "corrupt at line 1", "MAC mismatch")
    assert "key id" in msg
    assert _eps([(s, q, 1) for s, q, _ in RUNS]) < eps  # what the forgery would have shown


def test_rewriting_as_an_old_format_ledger_is_not_migrated_once_anchored(three_rounds):
    settings, path, _ = three_rounds
    path.write_bytes(_v1_lines([(0.8, 0.05, 1)]))  # plain-sha256 format, one tiny round
    _refused(settings, "format-1 record", "not migrated")


def test_restored_old_backup_is_refused(three_rounds, tmp_path):
    settings, path, _ = three_rounds
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(path, backup / "ledger")
    ledger = _open(settings)
    _reserve(ledger, 4, 1.5, 0.05, 30)
    eps4 = ledger.epsilon(delta=DELTA, accountant="rdp")
    shutil.copy(backup / "ledger", path)  # the ledger alone restored: the audit log disagrees
    _refused(settings, "holds 6 records but record 7 was confirmed")
    recover_ledger(settings)
    assert _open(settings).epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps4)


def test_restored_ledger_and_audit_log_are_caught_by_the_signed_report(three_rounds, tmp_path):
    settings, path, _ = three_rounds
    audit = settings.output_dir / "audit.jsonl"
    saved = {p: p.read_bytes() for p in (path, audit)}
    ledger = _open(settings)
    _reserve(ledger, 4, 1.5, 0.05, 30)
    report = _report(settings, ledger, 4)
    assert (report.privacy.ledger_seq, report.privacy.ledger_head) == ledger.head()
    for p, data in saved.items():  # ledger AND audit log from before round 4
        p.write_bytes(data)
    _refused(settings, "record 7 was confirmed (anchored in privacy-reports/report-round-4.json)")
    # The local signed record is incomplete now: recovery refuses rather than lowering ε.
    with pytest.raises(LedgerError, match="behind the site's signed privacy reports"):
        recover_ledger(settings)


# ---- recovery, crashes, migration, keys ----------------------------------------------------


def test_recovery_is_audited_exact_and_keeps_the_old_file(three_rounds):
    settings, path, eps = three_rounds
    heads = [e.hash for e in _open(settings).entries()]
    damaged = path.read_bytes()[:-40]
    path.write_bytes(damaged)
    got = recover_ledger(settings)
    assert got.previous is not None and got.previous.read_bytes() == damaged
    ledger = _open(settings)
    assert [e.hash for e in ledger.entries()] == heads  # record for record: every anchor matches
    assert got.epsilon == pytest.approx(eps) and ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps)
    keys = {"site-a": load_public_key(settings.signing_key.with_name("site-a.key.pub"))}
    audit = settings.output_dir / "audit.jsonl"
    verify_log(audit, keys)
    kinds = [json.loads(line)["kind"] for line in audit.read_text().splitlines()]
    assert kinds.count("ledger_anchor") == 6 and kinds[-1] == "ledger_recovered"


def test_crash_between_ledger_write_and_anchor_is_caught_up(three_rounds):
    settings, path, _ = three_rounds
    bare = Ledger(path, site_id="site-a", key_path=settings.output_dir / "ledger.key")  # no audit sink
    _reserve(bare, 4, 1.5, 0.05, 30)
    eps4 = bare.epsilon(delta=DELTA, accountant="rdp")
    _open(settings)  # anchors record 7 now
    path.unlink()
    assert recover_ledger(settings).epsilon == pytest.approx(eps4)


def test_torn_unanchored_reservation_is_still_set_aside(three_rounds):
    settings, path, eps = three_rounds
    whole = path.read_bytes()
    record = _lines(path)[-2]  # any complete record's bytes, cut short: a kill -9 mid-write
    path.write_bytes(whole + record[: len(record) // 2])
    ledger = _open(settings)
    assert path.read_bytes() == whole and len(list(path.parent.glob("*.torn-*"))) == 1
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps)


def test_missing_key_with_an_authenticated_ledger_is_an_error(three_rounds):
    settings, path, _ = three_rounds
    (settings.output_dir / "ledger.key").unlink()
    _refused(settings, "ledger key", "is missing", "never re-keyed silently")


def test_rotate_key_keeps_every_anchor(three_rounds):
    settings, path, eps = three_rounds
    before = [(e.seq, e.hash) for e in _open(settings).entries()]
    macs = [json.loads(raw)["mac"] for raw in _lines(path)]
    old_id, new_id = rotate_key(settings)
    assert old_id != new_id and list(settings.output_dir.glob("ledger.key.retired-*"))
    ledger = _open(settings)
    assert [(e.seq, e.hash) for e in ledger.entries()] == before
    assert all(json.loads(raw)["mac"] != m for raw, m in zip(_lines(path), macs, strict=True))
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps)
    assert '"ledger_rekeyed"' in (settings.output_dir / "audit.jsonl").read_text()


def _v1_lines(runs, site_id="site-a"):
    out = []
    for i, (sigma, q, steps) in enumerate(runs, start=1):
        rec = {"seq": i, "kind": "reserve", "round_id": str(i), "noise_multiplier": sigma, "sample_rate": q,
               "steps": steps, "delta": DELTA, "accountant": "rdp", "time": "2026-01-01T00:00:00+00:00",
               "site_id": site_id, "ref": None}
        rec["sha256"] = hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        out.append(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return b"".join(out)


def test_format_1_ledger_migrates_without_changing_epsilon(tmp_path):
    settings = _settings(tmp_path)
    path = settings.ledger_path
    path.parent.mkdir(parents=True)
    old = _v1_lines(RUNS)
    path.write_bytes(old)
    ledger = _open(settings)
    assert ledger.history() == RUNS
    assert {e.noise_source for e in ledger.entries()} == {"unspecified"}  # not recorded before
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(_eps(RUNS), rel=1e-12)
    assert path.with_name(path.name + ".pre-mac").read_bytes() == old
    assert all("mac" in json.loads(raw) for raw in _lines(path))
    text = (settings.output_dir / "audit.jsonl").read_text()
    assert text.count('"ledger_anchor"') == 3 and '"ledger_migrated"' in text
    _open(settings)  # reopening neither migrates again nor re-anchors
    assert (settings.output_dir / "audit.jsonl").read_text() == text
    path.unlink()  # and the migrated history is recoverable from its anchors
    assert recover_ledger(settings).epsilon == pytest.approx(_eps(RUNS), rel=1e-12)


def _report(settings, ledger, round_id) -> SiteRoundReport:
    privacy = ledger_privacy(ledger.entries(), round_id=round_id, epsilon_ceiling=CEILING,
                             max_grad_norm=1.0, secure_mode=False)
    report = SiteRoundReport(
        site_id="site-a", run_id="r", round=round_id, created=datetime.now(UTC), privacy=privacy,
        metrics={}, metrics_mode="suppressed-aggregates", software=software_versions(),
        model=ModelInfo(id="m", family="llama", identity_hash="0" * 64), config_hash="0" * 64,
    )
    write_site_report(report, settings.output_dir, key=site_audit_log(settings).key)
    return report


def test_recover_command_prints_epsilon_and_exits_nonzero_when_refused(three_rounds, monkeypatch):
    from typer.testing import CliRunner

    from client.cli import app

    settings, path, eps = three_rounds
    monkeypatch.setenv("FEDSYNTH_SITE_SITE_ID", "site-a")
    monkeypatch.setenv("FEDSYNTH_SITE_SIGNING_KEY", str(settings.signing_key))
    path.unlink()
    args = ["ledger", "recover", "--output-dir", str(settings.output_dir)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "6 records (6 from the audit log)" in done.output and f"ε {eps:.4f}" in done.output
    monkeypatch.setenv("FEDSYNTH_SITE_DELTA", str(DELTA))
    budget = CliRunner().invoke(app, ["budget", "--json", "--output-dir", str(settings.output_dir)])
    assert budget.exit_code == 0, budget.output
    shown = json.loads(budget.output)
    assert shown["epsilon_spent"] == pytest.approx(eps) and shown["ledger_seq"] == 6
    assert shown["ledger_head"] == _open(settings).head()[1]
    (settings.output_dir / "audit.jsonl").write_bytes(b"")  # the signed record is gone too
    (settings.output_dir / "privacy-reports").mkdir()
    _report(settings, _open_bare(settings), 3)
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == LedgerError.exit_code and "recovery refused" in refused.output


def _open_bare(settings) -> Ledger:
    return Ledger(settings.ledger_path, site_id="site-a", key_path=settings.output_dir / "ledger.key")


def test_an_edited_audit_log_cannot_vouch_for_a_lowered_ledger(three_rounds):
    settings, path, _ = three_rounds
    audit = settings.output_dir / "audit.jsonl"
    site_audit_log(settings).append("round", {"round": 3, "phase": "train"})  # later entries exist
    lines = audit.read_bytes().splitlines(keepends=True)
    cut = [raw for raw in lines
           if json.loads(raw)["kind"] != "ledger_anchor" or json.loads(raw)["data"]["seq"] == 1]
    audit.write_bytes(b"".join(cut))  # drop the anchors of records 2..6 to match a cut ledger ...
    path.write_bytes(_lines(path)[0])
    _refused(settings, "audit log", "does not verify")  # ... which breaks the signed chain


def test_reservation_records_and_anchors_its_noise_source(three_rounds):
    settings, path, _ = three_rounds
    assert {e.noise_source for e in _open(settings).entries()} == {"test"}
    anchors = [json.loads(line)["data"] for line in (settings.output_dir / "audit.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "ledger_anchor"]
    assert [(a["seq"], a["kind"], a["noise_source"], a["cause"]) for a in anchors[:2]] == [
        (1, "reserve", "test", "reserve"), (2, "released", "test", "release")]
    assert anchors[0]["epsilon"] == pytest.approx(_eps(RUNS[:1]))


# kill -9 at random points of reserve(): mid ledger write, between the ledger's fsync and its
# anchor, mid audit-log write. Every reopen through the start-up check must succeed (a crash is
# not tampering) and show at least the epsilon the writer saw confirmed.
_ANCHORED_WRITER = """
import os, sys
from pathlib import Path
from client.dp.ledger import compute_epsilon
from client.dp.ledger_anchor import open_site_ledger
from client.dp.ledger_recovery import site_audit_log
from shared.settings import SiteSettings, load_settings
compute_epsilon([(1.0, 0.5, 1)], delta=1e-5, accountant="rdp")
settings = load_settings(SiteSettings, site_id="site-a", output_dir=Path(sys.argv[1]), signing_key=Path(sys.argv[2]))
for command in sys.stdin:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        ledger = open_site_ledger(settings, site_audit_log(settings))
        i = 0
        while True:
            ledger.reserve(round_id=f"{os.getpid()}-{i}", noise_multiplier=1.2, sample_rate=0.01,
                           steps=20, delta=1e-5, accountant="rdp", epsilon_ceiling=1e9)
            print(ledger.epsilon(delta=1e-5, accountant="rdp"), flush=True)
            i += 1
    print("child", pid, flush=True)
    os.waitpid(pid, 0)
    print("dead", flush=True)
"""


def _anchored_kill_runs(tmp_path, kills):
    import os
    import random
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    settings = _settings(tmp_path)
    rng, floor = random.Random(99), 0.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _ANCHORED_WRITER, str(settings.output_dir), str(settings.signing_key)],
        cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        for _ in range(kills):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            printed, child, want = [], None, rng.randint(1, 3)
            while child is None or len(printed) < want:
                line = proc.stdout.readline()
                assert line, "writer process died"
                if line.startswith("child"):
                    child = int(line.split()[1])
                else:
                    printed.append(float(line))
            threading.Event().wait(rng.uniform(0.0, 0.03))
            os.kill(child, signal.SIGKILL)
            for line in iter(proc.stdout.readline, ""):
                if line.endswith("dead\n"):
                    break
                printed.append(float(line))
            eps = _open(settings).epsilon(delta=1e-5, accountant="rdp")  # a crash never blocks the site
            assert eps >= printed[-1] >= floor
            floor = eps
    finally:
        proc.kill()
        proc.wait()
    return settings, floor


def test_kill_9_with_anchors_never_blocks_or_lowers(tmp_path):
    settings, eps = _anchored_kill_runs(tmp_path, kills=3)
    settings.ledger_path.unlink()  # and every confirmed record is in the audit log
    assert recover_ledger(settings).epsilon >= eps


@pytest.mark.integration
def test_kill_9_with_anchors_many_times(tmp_path):
    _anchored_kill_runs(tmp_path, kills=30)


def test_recovery_keeps_authentic_records_the_audit_log_missed(three_rounds):
    settings, path, _ = three_rounds
    bare = Ledger(path, site_id="site-a", key_path=settings.output_dir / "ledger.key")  # no anchor
    _reserve(bare, 4, 1.5, 0.05, 30)
    eps4 = bare.epsilon(delta=DELTA, accountant="rdp")
    lines = _lines(path)
    lines[0] = lines[0].replace(b'"steps":60', b'"steps":6')
    path.write_bytes(b"".join(lines))
    _refused(settings, "corrupt at line 1")
    got = recover_ledger(settings)
    assert (got.records, got.from_anchors) == (7, 6) and got.epsilon == pytest.approx(eps4)
    assert _open(settings).epsilon(delta=DELTA, accountant="rdp") == pytest.approx(eps4)


def test_wrong_site_id_is_a_settings_error_not_corruption(three_rounds, tmp_path):
    # `fedsynth-site budget` without FEDSYNTH_SITE_SITE_ID used to say "restore it from backup"
    settings, _, _ = three_rounds
    default_id = load_settings(SiteSettings, output_dir=settings.output_dir, signing_key=settings.signing_key)
    from shared.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _open(default_id)
    msg = str(err.value)
    assert "FEDSYNTH_SITE_SITE_ID=site-a" in msg and "backup" not in msg
    assert _open(settings).epsilon(delta=DELTA, accountant="rdp") == pytest.approx(_eps(RUNS))
