import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from client.dp.ledger import Ledger
from shared.errors import BudgetExceededError, ConfigError, LedgerError

ROOT = Path(__file__).resolve().parents[3]
DELTA = 1e-5


def _reserve(ledger, i, sigma=1.0, q=0.01, steps=50, accountant="prv", ceiling=1e6):
    return ledger.reserve(
        round_id=f"r{i}", noise_multiplier=sigma, sample_rate=q, steps=steps,
        delta=DELTA, accountant=accountant, epsilon_ceiling=ceiling,
    )


def _opacus(cls, history, delta=DELTA):
    acc = cls()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_empty_ledger_is_zero_and_created(tmp_path):
    path = tmp_path / "deep" / "dir" / "ledger.jsonl"
    ledger = Ledger(path, site_id="h1")
    assert path.is_file() and path.read_bytes() == b""
    assert ledger.entries() == [] and ledger.history() == []
    assert ledger.epsilon(delta=DELTA) == 0.0 and ledger.epsilon(delta=DELTA, accountant="rdp") == 0.0


def test_epsilon_equals_independent_opacus_computation(tmp_path):
    runs = [(1.1, 0.02, 40), (0.9, 0.01, 60), (1.3, 0.05, 20)]  # distinct (sigma, q): no merging
    ledger = Ledger(tmp_path / "l.jsonl")
    for i, (sigma, q, steps) in enumerate(runs):
        _reserve(ledger, i, sigma, q, steps)
    assert ledger.history() == runs
    # composition order differs (runs are composed sorted): equal up to float round-off
    assert ledger.epsilon(delta=DELTA, accountant="prv") == pytest.approx(_opacus(PRVAccountant, runs), rel=1e-12)
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(_opacus(RDPAccountant, runs), rel=1e-12)
    assert ledger.epsilon(delta=1e-3, accountant="rdp") == pytest.approx(
        _opacus(RDPAccountant, runs, delta=1e-3), rel=1e-12
    )
    # the whole history counts: more than the last round alone
    assert ledger.epsilon(delta=DELTA) > _opacus(PRVAccountant, runs[-1:])


def test_repeated_rounds_compose_like_one_longer_run(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    for i in range(3):
        _reserve(ledger, i, 1.0, 0.02, 30)
    assert ledger.history() == [(1.0, 0.02, 30)] * 3
    assert ledger.epsilon(delta=DELTA, accountant="rdp") == pytest.approx(
        _opacus(RDPAccountant, [(1.0, 0.02, 30)] * 3), rel=1e-9
    )
    assert ledger.epsilon(delta=DELTA, accountant="prv") == pytest.approx(
        _opacus(PRVAccountant, [(1.0, 0.02, 90)]), rel=1e-9
    )


def test_epsilon_survives_reopening_and_release_does_not_change_it(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path, site_id="h1")
    e1 = _reserve(ledger, 1, accountant="rdp")
    _reserve(ledger, 2, sigma=0.8, accountant="rdp")
    before = ledger.epsilon(delta=DELTA, accountant="rdp")
    ledger.mark_released(e1)
    reopened = Ledger(path, site_id="h1")
    assert reopened.epsilon(delta=DELTA, accountant="rdp") == before
    kinds = [(e.seq, e.kind, e.round_id) for e in reopened.entries()]
    assert kinds == [(1, "reserve", "r1"), (2, "reserve", "r2"), (3, "released", "r1")]
    with pytest.raises(LedgerError, match="already released"):
        reopened.mark_released(e1)


def test_projected_epsilon_and_ceiling_refusal_writes_nothing(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    _reserve(ledger, 1, 1.0, 0.02, 50, accountant="rdp", ceiling=5.0)
    spent = ledger.epsilon(delta=DELTA, accountant="rdp")
    projected = ledger.projected_epsilon(
        noise_multiplier=0.7, sample_rate=0.05, steps=200, delta=DELTA, accountant="rdp"
    )
    assert projected == pytest.approx(_opacus(RDPAccountant, [(1.0, 0.02, 50), (0.7, 0.05, 200)]), rel=1e-12)
    assert spent < 5.0 < projected
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError) as err:
        _reserve(ledger, 2, 0.7, 0.05, 200, accountant="rdp", ceiling=5.0)
    assert err.value.projected_epsilon == projected and err.value.ceiling == 5.0
    assert f"{projected:.4f}" in str(err.value) and "ceiling 5" in str(err.value)
    assert path.read_bytes() == before
    assert len(ledger.entries()) == 1


def test_bad_values_raise_one_config_error_listing_each(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(ConfigError) as err:
        ledger.reserve(round_id="", noise_multiplier=0.0, sample_rate=1.5, steps=0, delta=1.0,
                       accountant="gdp", epsilon_ceiling=-1)
    assert len(err.value.problems) == 7
    msg = str(err.value)
    for word in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant", "round_id", "epsilon_ceiling"):
        assert word in msg
    with pytest.raises(ConfigError):
        ledger.epsilon(delta=0.0)
    with pytest.raises(ConfigError):
        ledger.projected_epsilon(noise_multiplier=1.0, sample_rate=0.0, steps=1, delta=DELTA)
    assert ledger.entries() == []


def _three_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    for i in range(3):
        _reserve(ledger, i, accountant="rdp")
    return path, path.read_bytes().splitlines(keepends=True)


def test_torn_last_line_is_moved_aside_and_ledger_goes_on(tmp_path):
    path, lines = _three_lines(tmp_path)
    torn = lines[2][: len(lines[2]) // 2]
    path.write_bytes(b"".join(lines[:2]) + torn)
    ledger = Ledger(path)
    assert [e.seq for e in ledger.entries()] == [1, 2]
    assert path.read_bytes() == b"".join(lines[:2])
    (aside,) = tmp_path.glob("l.jsonl.torn-*")
    assert aside.read_bytes() == torn  # no byte lost
    assert _reserve(ledger, 9, accountant="rdp").seq == 3
    assert [e.seq for e in Ledger(path).entries()] == [1, 2, 3]


def test_complete_last_line_without_newline_still_counts(tmp_path):
    path, lines = _three_lines(tmp_path)
    path.write_bytes(b"".join(lines)[:-1])
    assert [e.seq for e in Ledger(path).entries()] == [1, 2, 3]
    assert path.read_bytes() == b"".join(lines)


@pytest.mark.parametrize(
    "mutate, line, reason",
    [
        (lambda ls: ls[:1] + [ls[1].replace(b'"steps":50', b'"steps":5')] + ls[2:], 2, "hash mismatch"),
        (lambda ls: ls[:1] + [b"{garbage\n"] + ls[2:], 2, "not valid JSON"),
        (lambda ls: [ls[0], ls[2]], 2, "sequence gap: expected seq 2, found 3"),
        (lambda ls: ls[:2] + [ls[2].replace(b'"steps":50', b'"steps":1')], 3, "hash mismatch"),
    ],
    ids=["middle-checksum", "middle-garbage", "gap", "complete-last-tampered"],
)
def test_corruption_raises_ledger_error_naming_the_line(tmp_path, mutate, line, reason):
    path, lines = _three_lines(tmp_path)
    path.write_bytes(b"".join(mutate(lines)))
    before = path.read_bytes()
    with pytest.raises(LedgerError) as err:
        Ledger(path)
    assert f"{path} is corrupt at line {line}: {reason}" in str(err.value)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))


def test_noise_source_and_round_id_are_checked(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    with pytest.raises(ConfigError) as err:
        ledger.reserve(round_id="r" * 500, noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=DELTA,
                       accountant="rdp", epsilon_ceiling=10.0, noise_source="free text\nhere")
    assert {p.where for p in err.value.problems} == {"round_id", "noise_source"}
    entry = ledger.reserve(round_id="r1", noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=DELTA,
                           accountant="rdp", epsilon_ceiling=10.0, noise_source="csprng")
    assert Ledger(tmp_path / "l.jsonl").entries() == [entry] and entry.noise_source == "csprng"


def test_another_sites_ledger_is_refused(tmp_path):
    path, _ = _three_lines(tmp_path)
    with pytest.raises(LedgerError, match="belongs to site 'site', not 'h2'"):
        Ledger(path, site_id="h2")


def test_lock_keeps_concurrent_appends_in_sequence(tmp_path):
    path = tmp_path / "l.jsonl"
    Ledger(path)

    def worker(name):
        ledger = Ledger(path)  # its own file handle, so flock really arbitrates
        for i in range(8):
            _reserve(ledger, f"{name}{i}", accountant="rdp")

    threads = [threading.Thread(target=worker, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = Ledger(path).entries()
    assert [e.seq for e in entries] == list(range(1, 17))
    assert len({e.round_id for e in entries}) == 16


# One interpreter pays the torch/opacus import once, then forks a fresh writer
# per kill: each writer appends reserves in a loop and prints the epsilon it sees
# after every reserve() returned (i.e. after the record was fsynced).
_WRITER = """
import os, sys
from pathlib import Path
from client.dp.ledger import Ledger, compute_epsilon
compute_epsilon([(1.0, 0.5, 1)], delta=1e-5, accountant="rdp")  # warm the import
path = Path(sys.argv[1])
for command in sys.stdin:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        ledger = Ledger(path)
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


def _kill_runs(tmp_path, kills):
    path = tmp_path / "ledger.jsonl"
    rng = random.Random(1234)
    floor = 0.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
    )
    try:
        for _ in range(kills):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            printed, child = [], None
            want = rng.randint(1, 4)
            while child is None or len(printed) < want:
                line = proc.stdout.readline()
                assert line, "writer process died"
                if line.startswith("child"):
                    child = int(line.split()[1])
                else:
                    printed.append(float(line))
            threading.Event().wait(rng.uniform(0.0, 0.03))  # land the kill at a random point
            os.kill(child, signal.SIGKILL)
            for line in iter(proc.stdout.readline, ""):
                if line.endswith("dead\n"):
                    # A value the child was killed while printing is glued to "dead":
                    # it was never confirmed, so it is not part of what must survive.
                    break
                printed.append(float(line))
            eps = Ledger(path).epsilon(delta=1e-5, accountant="rdp")  # reopens without error
            assert eps >= printed[-1] >= floor
            floor = eps
    finally:
        proc.kill()
        proc.wait()
    return path


def test_kill_9_mid_append_never_lowers_epsilon(tmp_path):
    path = _kill_runs(tmp_path, kills=4)
    assert len(Ledger(path).entries()) >= 4


@pytest.mark.integration
def test_kill_9_many_times(tmp_path):
    _kill_runs(tmp_path, kills=40)


def test_written_lines_are_self_describing(tmp_path):
    path = tmp_path / "l.jsonl"
    _reserve(Ledger(path, site_id="h1"), 1)
    rec = json.loads(path.read_text())
    assert rec["seq"] == 1 and rec["site_id"] == "h1" and rec["kind"] == "reserve"
    assert rec["prev"] == "0" * 64 and len(rec["hash"]) == 64 and len(rec["mac"]) == 64
    assert rec["noise_source"] == "unspecified"


def test_garbage_last_line_after_power_loss_is_moved_aside(tmp_path):
    path, lines = _three_lines(tmp_path)
    path.write_bytes(b"".join(lines[:2]) + b"\x00" * 40 + b"\n")
    assert [e.seq for e in Ledger(path).entries()] == [1, 2]
    (aside,) = tmp_path.glob("l.jsonl.torn-*")
    assert aside.read_bytes() == b"\x00" * 40 + b"\n"


def test_ledger_key_is_private_and_created_whole(tmp_path):
    from client.dp.ledger_key import read_key, write_new_key

    path = tmp_path / "k" / "ledger.key"
    key = write_new_key(path)
    assert read_key(path) == key and len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        write_new_key(path)
    assert read_key(path) == key and list(path.parent.iterdir()) == [path]  # no temp file left
