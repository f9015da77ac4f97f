"""Whole-directory checks of ``fedsynth-verify``: do the logs, reports and checkpoints agree?

A signature proves who wrote a file, not that the file is the one that should be
there. Per file, a cut log is a valid shorter chain, another site's log is
validly signed, and last round's report is validly signed too. These checks bind
the files of one directory tree to each other:

- each report belongs to the audit log nearest above it (``audit.jsonl`` or
  ``*.audit.jsonl``; ``launcher.audit.jsonl`` is the launcher's refusal log and
  never a report's log): no such log, or an empty one, fails the report;
- the log is bound to the report's signer (the site id, or the coordinator):
  every entry must carry that actor and be signed with that actor's key, so a
  log swapped for, or rewritten as, another party's fails;
- every ``report_issued`` entry names a report file and its sha256: the file
  must exist with that hash (the latest entry for a path wins, a site may
  re-issue a round), and every report must be named by one (with its round);
- a report's ``audit_seq``/``audit_head`` (the log's length and last hash when
  it was written) must be a prefix of the log: a log cut below it fails;
- every checkpoint the consortium report lists must exist with its sha256;
- a launcher log's actor is ``<site>-launcher``, signed with the site's key.

What this cannot see: entries cut off after the last report was issued (nothing
signed names them), and a directory whose log and reports were all removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.audit import GENESIS
from shared.errors import InputError
from shared.report import SiteRoundReport
from shared.report_consortium import ConsortiumReport
from shared.report_io import parse_report
from shared.signing import key_names, sha256_file

LAUNCHER_LOG = "launcher.audit.jsonl"
LAUNCHER_SUFFIX = "-launcher"

# Result(path, status, message, details) -> a Result; passed in to avoid an import cycle with verify.
MakeResult = Callable[..., Any]


def _entries(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            out.append(json.loads(line))
    return out


def _is_log(path: Path) -> bool:
    return path.name == "audit.jsonl" or path.name.endswith(".audit.jsonl")


def _reports(files: Sequence[Path]) -> dict[Path, SiteRoundReport | ConsortiumReport]:
    out: dict[Path, SiteRoundReport | ConsortiumReport] = {}
    for f in files:
        if f.suffix != ".json":
            continue
        try:
            obj = json.loads(f.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if not isinstance(obj, dict) or "report_type" not in obj:
            continue
        try:
            out[f] = parse_report(f, f.read_bytes())
        except InputError:
            continue  # already failed per file (schema)
    return out


def _up_to(start: Path, root: Path) -> list[Path]:
    """``start`` and its parents, up to and including ``root`` (never above what was given)."""
    out = []
    for d in (start, *start.parents):
        out.append(d)
        if d == root:
            break
    return out


def _owner(report: SiteRoundReport | ConsortiumReport, coordinator: str) -> str:
    return report.site_id if isinstance(report, SiteRoundReport) else coordinator


def check_trail(root: Path, files: Sequence[Path], failed: set[Path],
                keys: Mapping[str, Ed25519PublicKey], coordinator: str, result: MakeResult) -> list[Any]:
    """Cross-checks for the files under directory ``root``; ``failed``: files that already failed."""
    names = key_names(keys)
    out: list[Any] = []
    logs = [f for f in files if _is_log(f)]
    main_logs: dict[Path, list[Path]] = {}
    for log_path in logs:
        if log_path.name != LAUNCHER_LOG:
            main_logs.setdefault(log_path.parent, []).append(log_path)
    reports = _reports(files)

    # Each report's log: the nearest directory at or above it (within root) holding one.
    groups: dict[Path, list[Path]] = {}
    for rpath in sorted(reports):
        home = next((d for d in _up_to(rpath.parent, root) if d in main_logs), None)
        if home is None:
            out.append(result(rpath, "FAIL", "no audit log for this report (deleted?): expected "
                              f"audit.jsonl at or above {rpath.parent}"))
            continue
        if len(main_logs[home]) > 1:
            out.append(result(rpath, "FAIL", f"several audit logs in {home}: "
                              f"{', '.join(p.name for p in main_logs[home])}; which one issued it?"))
            continue
        groups.setdefault(main_logs[home][0], []).append(rpath)

    expected_actor: dict[Path, str] = {}
    for log_path in (p for ps in main_logs.values() for p in ps):
        owners = {_owner(reports[r], coordinator) for r in groups.get(log_path, [])}
        if len(owners) > 1:
            out.append(result(log_path, "FAIL", f"reports of several parties share this log: {sorted(owners)}"))
            continue
        actor = next(iter(owners), None)
        if actor is None:  # no report: bind to the directory's name when it names a key
            actor = next((d.name for d in _up_to(log_path.parent, root)
                          if d.name in keys and d.name != coordinator), None)
            if actor is None and log_path.name.removesuffix(".audit.jsonl") in keys:
                actor = log_path.name.removesuffix(".audit.jsonl")
        if actor is not None:
            expected_actor[log_path] = actor
        if log_path in failed:
            continue  # its chain is already reported broken; cross-checking it says nothing more
        out += _check_main_log(log_path, actor, groups.get(log_path, []), reports, names, result, failed)

    for log_path in logs:
        if log_path.name == LAUNCHER_LOG and log_path not in failed:
            site = next((expected_actor[p] for p in main_logs.get(log_path.parent, [])
                         if p in expected_actor), None)
            out += _check_launcher_log(log_path, site, names, result)

    for rpath, report in reports.items():
        if isinstance(report, ConsortiumReport) and rpath not in failed:
            out += _check_checkpoints(rpath, report, result, failed)
    return out


def _check_main_log(log_path: Path, actor: str | None, rpaths: list[Path],
                    reports: Mapping[Path, SiteRoundReport | ConsortiumReport],
                    names: Mapping[str, str], result: MakeResult, failed: set[Path]) -> list[Any]:
    problems: list[str] = []
    entries = _entries(log_path)
    if rpaths and not entries:
        return [result(log_path, "FAIL", f"audit log is empty but {len(rpaths)} report(s) were issued "
                       "from it (log emptied?)")]
    if actor is not None:
        for e in entries:
            signer = names.get(e.get("key_id") or "")
            if e.get("actor") != actor or signer != actor:
                problems.append(f"entry seq={e.get('seq')}: actor {e.get('actor')!r} signed by "
                                f"{signer!r}, but this is {actor!r}'s log (log swapped or rewritten?)")
                break
    issued: dict[str, dict[str, Any]] = {}  # report path (relative to the log's directory) -> latest entry
    for e in entries:
        data = e.get("data") or {}
        if e.get("kind") == "report_issued" and isinstance(data.get("report"), str):
            issued[data["report"]] = e
    base = log_path.parent
    for rel, e in sorted(issued.items()):
        target = base / rel
        if not target.is_file():
            problems.append(f"entry seq={e['seq']} issued {rel}, which is missing (report deleted?)")
        elif target not in failed and data_sha(e) != sha256_file(target):  # a failed one is reported
            problems.append(f"entry seq={e['seq']} issued {rel} with sha256 {str(data_sha(e))[:16]}…, "
                            "the file differs (report replaced?)")
    for rpath in rpaths:
        rel = rpath.relative_to(base).as_posix()
        report = reports[rpath]
        e = issued.get(rel)
        if e is None:
            problems.append(f"{rel} has no report_issued entry in the log (log cut or swapped?)")
            continue
        want = (e.get("data") or {}).get("round")
        if isinstance(report, SiteRoundReport) and want is not None and want != report.round:
            problems.append(f"{rel} is round {report.round}, the log issued round {want} there")
        seq, head = report.audit_seq, report.audit_head
        if seq is None:
            continue
        if seq > len(entries) or e["seq"] < seq:
            problems.append(f"{rel} was issued after entry {seq} of this log; the log has "
                            f"{len(entries)} (log cut short?)")
        elif (entries[seq - 1]["hash"] if seq else GENESIS) != head:
            problems.append(f"{rel} names log head {str(head)[:16]}… at entry {seq}; the log differs there")
    if problems:
        return [result(log_path, "FAIL", "audit trail does not match the reports", problems)]
    return [result(log_path, "OK", f"audit trail matches: {len(rpaths)} report(s) issued by "
                   f"{actor or 'an unbound actor'}, every report_issued entry has its file")]


def data_sha(entry: Mapping[str, Any]) -> Any:
    return (entry.get("data") or {}).get("report_sha256")


def _check_launcher_log(log_path: Path, site: str | None, names: Mapping[str, str],
                        result: MakeResult) -> list[Any]:
    for e in _entries(log_path):
        actor, signer = str(e.get("actor")), names.get(e.get("key_id") or "")
        owner = actor.removesuffix(LAUNCHER_SUFFIX)
        if not actor.endswith(LAUNCHER_SUFFIX) or signer != owner or (site is not None and owner != site):
            return [result(log_path, "FAIL", f"entry seq={e.get('seq')}: launcher log entry by {actor!r} "
                           f"signed by {signer!r}; expected '<site>{LAUNCHER_SUFFIX}' signed by "
                           f"{site or 'that site'!r}")]
    return []


def _check_checkpoints(rpath: Path, report: ConsortiumReport, result: MakeResult,
                       failed: set[Path]) -> list[Any]:
    problems = []
    for ck in report.checkpoints:
        path = rpath.parent / ck.path
        if not path.is_file():
            problems.append(f"round {ck.round}: {ck.path} is missing")
        elif path not in failed and sha256_file(path) != ck.sha256:
            problems.append(f"round {ck.round}: {ck.path} sha256 differs from the report (altered?)")
    if problems:
        return [result(rpath, "FAIL", "checkpoints do not match the consortium report", problems)]
    if report.checkpoints:
        return [result(rpath, "OK", f"{len(report.checkpoints)} checkpoint(s) match their sha256")]
    return []
