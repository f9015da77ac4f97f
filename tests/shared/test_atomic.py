"""shared.atomic: whole-file rewrites that a crash leaves old or new, never torn."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared import atomic
from shared.atomic import PRIVATE, replace_dir, write_atomic, write_new

ROOT = Path(__file__).resolve().parents[2]
SIZE = 1 << 21  # 2 MiB a version: several write() calls, so a kill can land inside one


def _version(path: Path) -> int:
    """The version a file holds; AssertionError when it is torn (wrong length or mixed bytes)."""
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    version = int(head)
    # Raised, not asserted: pytest's explanation of a failed `==` on two 2 MiB byte
    # strings is a character diff that runs for many minutes.
    if len(body) != SIZE:
        raise AssertionError(f"torn: {len(body)} of {SIZE} bytes after the header")
    if body != bytes([version % 251]) * SIZE:
        raise AssertionError("torn: bytes of two versions mixed")
    return version


def _payload(version: int) -> bytes:
    return f"{version}\n".encode() + bytes([version % 251]) * SIZE


def test_version_check_catches_a_torn_file(tmp_path):
    # The kill test below is only as strong as this check: a half-written file must fail it.
    path = tmp_path / "f"
    path.write_bytes(_payload(3)[: SIZE // 2])
    with pytest.raises(AssertionError, match="torn"):
        _version(path)
    path.write_bytes(_payload(3)[:100] + _payload(4)[100:])
    with pytest.raises(AssertionError, match="torn"):
        _version(path)


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    assert write_atomic(path, "new é") == path
    assert path.read_text(encoding="utf-8") == "new é"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomic_private_mode_even_under_a_lax_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "key", b"secret", mode=PRIVATE)
        write_atomic(tmp_path / "public", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "public").stat().st_mode & 0o777 == 0o644


def test_write_atomic_failure_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_write_new_never_overwrites(tmp_path):
    path = write_new(tmp_path / "ledger.torn-1", b"tail")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_new(path, b"other")
    assert path.read_bytes() == b"tail"


def test_replace_dir_swaps_in_a_whole_folder(tmp_path):
    final = tmp_path / "round-0001"
    final.mkdir()
    (final / "stale").write_text("old run")
    tmp = tmp_path / ".round-0001.new"
    tmp.mkdir()
    (tmp / "weights").write_bytes(b"w")
    replace_dir(tmp, final, ["weights"])
    assert sorted(p.name for p in final.iterdir()) == ["weights"] and not tmp.exists()


# A writer that rewrites one file with growing versions and prints each version once
# write_atomic has returned (so it is confirmed: it must survive the kill).
_WRITER = """
import sys
from pathlib import Path
from shared.atomic import write_atomic
path, start, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
version = start
while True:
    version += 1
    write_atomic(path, f"{version}\\n".encode() + bytes([version % 251]) * size)
    print(version, flush=True)
"""


def _kill_runs(tmp_path: Path, kills: int) -> int:
    path = tmp_path / "checkpoint.bin"
    write_atomic(path, _payload(0))
    rng = random.Random(4321)
    current = 0
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(current), str(SIZE)], cwd=ROOT,
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
        )
        confirmed = current
        try:
            for _ in range(rng.randint(1, 3)):
                line = proc.stdout.readline()
                assert line, "writer process died"
                confirmed = int(line)
            threading.Event().wait(rng.uniform(0.0, 0.02))  # land the kill at a random point
            os.kill(proc.pid, signal.SIGKILL)
            for line in proc.stdout:
                confirmed = int(line)  # printed before the kill landed: confirmed as well
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        found = _version(path)  # whole: the old version or the new one, never torn
        assert confirmed <= found <= confirmed + 1, (confirmed, found)
        current = found
    return current


def test_kill_9_mid_write_leaves_old_or_new_file(tmp_path):
    assert _kill_runs(tmp_path, kills=5) >= 5


@pytest.mark.integration
def test_kill_9_many_times(tmp_path):
    _kill_runs(tmp_path, kills=50)
