"""Bundle trust: the site's pin of the agreed app bundle, the check of a task's bundle against it,
and the launcher's refusal log.

A pin (``pin.json``, written at install time by ``python -m client.launcher pin``) holds
the bundle's publisher, name, version and the sha256 of its bytes. :func:`verify_bundle`
reads a bundle from memory (nothing extracted, installed or imported) and refuses any
difference; :func:`record_refusal` appends each refusal to ``launcher.audit.jsonl``, the
launcher's own signed chain beside the site's audit log. :mod:`client.launcher` runs
these checks on every ClientApp task.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError, Problem, VerificationError
from shared.verify_trail import LAUNCHER_LOG, LAUNCHER_SUFFIX

log = logging.getLogger("fedsynth.launcher")  # the launcher's log: refusals belong to it

PIN_FIELDS = ("publisher", "name", "version", "sha256")
REFUSAL_REASON = "bundle_not_trusted"  # the fixed reason the coordinator gets; nothing else goes out
_MAX_PYPROJECT = 1 << 20  # bytes; a bundle's pyproject is a few KiB


@dataclass(frozen=True)
class BundleId:
    """What identifies an app bundle: Flower's app id parts and sha256 of the bundle bytes (hex)."""

    publisher: str
    name: str
    version: str
    sha256: str


def bundle_id(fab: bytes) -> BundleId:
    """Identify a bundle from its bytes without extracting or executing anything.

    Raises :class:`InputError` when the bytes are not a zip with a readable
    ``pyproject.toml`` carrying ``[project] name/version`` and
    ``[tool.flwr.app] publisher``.
    """
    digest = hashlib.sha256(fab).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            info = zf.getinfo("pyproject.toml")
            if info.file_size > _MAX_PYPROJECT:
                raise ValueError("pyproject.toml too large")
            with zf.open(info) as fh:
                config = tomllib.loads(fh.read(_MAX_PYPROJECT + 1).decode("utf-8"))
        project = config["project"]
        fields = (config["tool"]["flwr"]["app"]["publisher"], project["name"], project["version"])
    except Exception as exc:  # any malformed bundle is one refusal, never a crash
        raise InputError("not a readable app bundle",
                         [Problem("bundle", f"{type(exc).__name__}: {exc!s:.120}")]) from None
    if not all(isinstance(f, str) and f for f in fields):
        raise InputError("not a readable app bundle", [Problem("bundle", "empty publisher/name/version")])
    return BundleId(*fields, sha256=digest)


def build_bundle(path: Path | str) -> bytes:
    """The bundle bytes for an app directory (exactly what ``flwr run DIR`` sends) or a ``.fab`` file."""
    p = Path(path)
    if p.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return build_fab_from_disk(p)
    if p.is_file():
        return p.read_bytes()
    raise InputError("cannot pin", [Problem(str(p), "neither an app directory nor a .fab file")])


def write_pin(source: Path | str, out: Path | str) -> BundleId:
    """Pin the bundle built from ``source`` (dir or .fab) into the JSON file ``out``."""
    ident = bundle_id(build_bundle(source))
    Path(out).write_text(json.dumps(asdict(ident), indent=2, sort_keys=True) + "\n")
    return ident


def load_pin(path: Path | str) -> BundleId:
    """Read a pin file; every missing or malformed field is listed in one :class:`InputError`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError("cannot read pin", [Problem(str(path), type(exc).__name__)]) from None
    if not isinstance(raw, dict):
        raise InputError("cannot read pin", [Problem(str(path), "not a JSON object")])
    problems = [Problem(f"{path}:{k}", "missing or not a non-empty string")
                for k in PIN_FIELDS if not isinstance(raw.get(k), str) or not raw.get(k)]
    problems += [Problem(f"{path}:{k}", "unknown field") for k in sorted(set(raw) - set(PIN_FIELDS))]
    sha = raw.get("sha256")
    if isinstance(sha, str) and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        problems.append(Problem(f"{path}:sha256", "not 64 lowercase hex digits"))
    if problems:
        raise InputError("invalid pin file", problems)
    return BundleId(**{k: raw[k] for k in PIN_FIELDS})


def verify_bundle(fab: bytes, pin: BundleId, *, claimed_hash: str = "", fab_id: str = "",
                  fab_version: str = "") -> BundleId:
    """Refuse (:class:`VerificationError`, every mismatch listed) unless ``fab`` is the pinned bundle.

    ``claimed_hash``/``fab_id``/``fab_version`` are what the SuperLink says about
    the run (``Fab.hash_str``, ``Run.fab_id`` = ``publisher/name``,
    ``Run.fab_version``); when given they must agree with the bytes and the pin.
    """
    problems: list[Problem] = []
    digest = hashlib.sha256(fab).hexdigest()
    try:
        got: BundleId | None = bundle_id(fab)
    except InputError as exc:
        got = None
        problems.extend(exc.problems)
    if digest != pin.sha256:
        problems.append(Problem("bundle.sha256", f"{digest} != pinned {pin.sha256}"))
    if claimed_hash and claimed_hash != digest:
        problems.append(Problem("run.fab_hash", "the SuperLink's hash does not match the bytes"))
    if got is not None:
        for field in ("publisher", "name", "version"):
            if getattr(got, field) != getattr(pin, field):
                problems.append(Problem(f"bundle.{field}",
                                        f"{getattr(got, field)!r:.80} != pinned {getattr(pin, field)!r}"))
    if fab_id and fab_id != f"{pin.publisher}/{pin.name}":
        problems.append(Problem("run.fab_id", f"{fab_id!r:.80} != pinned {pin.publisher}/{pin.name}"))
    if fab_version and fab_version != pin.version:
        problems.append(Problem("run.fab_version", f"{fab_version!r:.40} != pinned {pin.version!r}"))
    if problems or got is None:
        raise VerificationError("app bundle not trusted by this site", problems)
    return got


def launcher_log_path(audit_log: Path) -> Path:
    """The launcher's refusal log: ``launcher.audit.jsonl`` (beside ``audit_log`` unless so named).

    Never the site's own ``audit.jsonl``: a second writer there (another actor) would
    make the site's log fail verification; the launcher keeps its own chain instead.
    """
    audit_log = Path(audit_log)
    if audit_log.name == LAUNCHER_LOG:
        return audit_log
    return (audit_log if audit_log.is_dir() else audit_log.parent) / LAUNCHER_LOG


def record_refusal(audit_log: Path | None, site: str, data: dict[str, Any],
           signing_key: Path | None = None) -> None:
    """Append a refusal to the launcher log, signed with the site key, actor ``<site>-launcher``."""
    if audit_log is None:
        return
    try:
        from shared.audit import AuditLog
        from shared.signing import load_private_key

        if signing_key is None:
            log.warning("no --signing-key: the refusal goes into %s unsigned; fedsynth-verify will "
                        "refuse that log", launcher_log_path(audit_log))
        key = load_private_key(signing_key) if signing_key is not None else None
        AuditLog(launcher_log_path(audit_log), key=key, actor=f"{site}{LAUNCHER_SUFFIX}").append(
            "update_rejected", data)
    except Exception:  # the local log line above is the record of last resort
        log.exception("could not write the refusal to the audit log %s", audit_log)
