"""``fedsynth-verify``: the auditor's one command, offline, needing only ``shared``.

    fedsynth-verify PATH... --key NAME=PUBKEY [--key ...] [--keys-dir DIR]

Walks files and directories and checks
- every signed file (``X`` with ``X.sig``) against the given public keys;
- every audit log (``audit.jsonl`` or ``*.audit.jsonl``): chain, hashes, signatures;
- every JSON report (a ``report_type`` field): signed, signed by the right party
  (a site report by the key named after its ``site_id``, a consortium report by
  the key named ``coordinator``), and valid against its schema;
- for each directory given, that its logs, reports and checkpoints agree
  (:mod:`shared.verify_trail`): a log cut short, emptied, deleted or swapped for
  another party's, a report deleted or replaced by another round's, a checkpoint
  altered all fail. Point it at whole site output / coordinator run directories:
  a single file given on its own is checked alone.

Exit codes: 0 every check passed; 1 at least one verification failure;
2 usage error or missing/bad keys; 3 an input could not be read (or nothing
verifiable was found) and nothing failed verification.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.about import version_line
from shared.audit import last_hash, verify_log
from shared.errors import FedsynthError, InputError, VerificationError
from shared.report import SiteRoundReport
from shared.report_io import parse_report
from shared.signing import key_id, key_names, load_public_key, signature_path, verify_file
from shared.verdict import consortium_verdict, site_verdict
from shared.verify_trail import check_trail

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
COORDINATOR = "coordinator"


@dataclass
class Result:
    """Outcome for one file: status is OK, FAIL, UNREADABLE or NOTE."""

    path: Path
    status: str
    message: str
    details: list[str] = field(default_factory=list)
    signer: str | None = None  # name of the key that signed it, when a signature was checked

    def lines(self) -> list[str]:
        return [f"{self.status:<10} {self.path}: {self.message}", *[f"           {d}" for d in self.details]]


def is_audit_log(path: Path) -> bool:
    return path.name == "audit.jsonl" or path.name.endswith(".audit.jsonl")


def _problems(exc: FedsynthError) -> list[str]:
    return [str(p) for p in exc.problems]


def _readable(*paths: Path) -> str | None:
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as exc:
            return f"cannot read {p.name}: {exc.strerror or exc}"
    return None


def _check_signed(path: Path, keys: Mapping[str, Ed25519PublicKey], names: dict[str, str]) -> Result:
    try:
        kid = verify_file(path, keys)
    except VerificationError as exc:
        if not exc.problems:
            return Result(path, "FAIL", exc.message)
        p = exc.problems[0]
        where = "" if p.where == str(path) else f"{Path(p.where).name}: "
        return Result(path, "FAIL", f"{where}{p.reason}")
    return Result(path, "OK", f"signature valid (signed by {names[kid]}, key {kid})", signer=names[kid])


def _check_report(path: Path, keys: Mapping[str, Ed25519PublicKey], names: dict[str, str],
                  coordinator: str) -> Result:
    if not signature_path(path).exists():
        return Result(path, "FAIL", f"report is not signed (no {signature_path(path).name})")
    signed = _check_signed(path, keys, names)
    if signed.status != "OK":
        return signed
    try:
        report = parse_report(path, path.read_bytes())
    except InputError as exc:
        return Result(path, "FAIL", "report does not match its schema", _problems(exc))
    signer = signed.signer
    if isinstance(report, SiteRoundReport):
        expected, what = report.site_id, f"site report {report.site_id} round {report.round}"
    else:
        expected, what = coordinator, f"consortium report run {report.run_id}"
    if signer != expected:
        return Result(path, "FAIL", f"{what} signed by {signer!r}, not by {expected!r}")
    if report.verdict is not None:
        # the verdict is a claim about the report's own numbers: it must follow from them
        recomputed = site_verdict(report) if isinstance(report, SiteRoundReport) else consortium_verdict(report)
        if recomputed != report.verdict:
            return Result(path, "FAIL", f"{what}: verdict {report.verdict.outcome!r} does not follow from "
                          f"its numbers and the stated thresholds (recomputed: {recomputed.outcome!r})")
    return Result(path, "OK", f"{what}: schema valid, signed by {signer}")


def _check_log(path: Path, keys: Mapping[str, Ed25519PublicKey]) -> Result:
    try:
        n = verify_log(path, keys)
    except VerificationError as exc:
        p = exc.problems[0] if exc.problems else None
        where = f"line {p.line}: " if p and p.line else ""
        return Result(path, "FAIL", f"{where}{p.reason if p else exc.message}")
    except InputError as exc:
        return Result(path, "UNREADABLE", exc.message, _problems(exc))
    return Result(path, "OK", f"audit log valid: {n} entries, last hash {last_hash(path)}")


def _is_report_json(path: Path) -> bool:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # an unparsable *.json beside a .sig is still checked as a signed file
    return isinstance(obj, dict) and "report_type" in obj


def check_file(path: Path, keys: Mapping[str, Ed25519PublicKey], *, explicit: bool = False,
               coordinator: str = COORDINATOR) -> Result | None:
    """Check one file; None when it is nothing to verify (and was found by walking)."""
    names = key_names(keys)
    name = path.name
    if ".torn-" in name:
        return Result(path, "NOTE", "torn line moved aside after a crash (not part of the chain)")
    if name.endswith(".tmp"):
        return None
    if name.endswith(".sig"):
        target = path.with_name(name[: -len(".sig")])
        if not target.exists():
            return Result(path, "FAIL", f"signature without its file {target.name}")
        return None  # checked together with its target
    unreadable = _readable(path, *([signature_path(path)] if signature_path(path).exists() else []))
    if unreadable:
        return Result(path, "UNREADABLE", unreadable)
    if is_audit_log(path):
        result = _check_log(path, keys)
        if result.status == "OK" and signature_path(path).exists():
            signed = _check_signed(path, keys, names)
            if signed.status != "OK":
                return signed
        return result
    if name.endswith(".json") and (_is_report_json(path) or (explicit and not signature_path(path).exists())):
        return _check_report(path, keys, names, coordinator)
    if signature_path(path).exists():
        return _check_signed(path, keys, names)
    if explicit:
        return Result(path, "FAIL", "nothing to verify: no .sig, not a report, not an audit log")
    return None


def verify_paths(paths: Sequence[Path], keys: Mapping[str, Ed25519PublicKey], *,
                 coordinator: str = COORDINATOR) -> list[Result]:
    """Check every file under ``paths`` (directories walked, sorted); one Result per checked file."""
    results: list[Result] = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            results.append(Result(root, "UNREADABLE", "does not exist"))
            continue
        if root.is_dir():
            try:
                files = sorted(p for p in root.rglob("*") if p.is_file())
            except OSError as exc:
                results.append(Result(root, "UNREADABLE", f"cannot list: {exc.strerror or exc}"))
                continue
            found = [r for f in files if (r := check_file(f, keys, coordinator=coordinator))]
            failed = {r.path for r in found if r.status != "OK"}
            results += found
            results += check_trail(root, files, failed, keys, coordinator, Result)
        else:
            r = check_file(root, keys, explicit=True, coordinator=coordinator)
            if r is None and root.name.endswith(".sig"):
                r = check_file(root.with_name(root.name[:-4]), keys, explicit=True, coordinator=coordinator)
            if r is not None:
                results.append(r)
    return results


def exit_code(results: Sequence[Result]) -> int:
    """1 if anything failed verification, else 3 if anything was unreadable or nothing checked, else 0."""
    if any(r.status == "FAIL" for r in results):
        return EXIT_FAILED
    if any(r.status == "UNREADABLE" for r in results) or not any(r.status == "OK" for r in results):
        return EXIT_UNREADABLE
    return EXIT_OK


def _key_name(path: Path) -> str:
    name = path.name.removesuffix(".pub")
    for suffix in (".key", ".pem"):
        name = name.removesuffix(suffix)
    return name


def load_keys(specs: Sequence[str], keys_dir: Path | None) -> dict[str, Ed25519PublicKey]:
    """Public keys by name from ``NAME=PATH`` specs and ``DIR/*.pub`` (name = file name minus .key.pub)."""
    problems: list[str] = []
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            problems.append(f"--key {spec!r}: expected NAME=PUBKEY_FILE")
        else:
            pairs.append((name, Path(value)))
    if keys_dir is not None:
        if not keys_dir.is_dir():
            problems.append(f"--keys-dir {keys_dir}: not a directory")
        else:
            pairs += [(_key_name(p), p) for p in sorted(keys_dir.glob("*.pub"))]
    keys: dict[str, Ed25519PublicKey] = {}
    for name, path in pairs:
        try:
            key = load_public_key(path)
        except InputError as exc:
            problems += _problems(exc) or [exc.message]
            continue
        if name in keys and key_id(keys[name]) != key_id(key):
            problems.append(f"two different keys named {name!r}")
        keys[name] = key
    ids: dict[str, str] = {}
    for name, key in keys.items():
        kid = key_id(key)
        if kid in ids:
            problems.append(f"the same key is named both {ids[kid]!r} and {name!r}")
        ids[kid] = name
    if not keys and not problems:
        problems.append("no public keys given (use --key NAME=PUBKEY or --keys-dir DIR)")
    if problems:
        raise _UsageError(problems)
    return keys


class _UsageError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsynth-verify",
        description="Verify fedsynth signatures, audit logs and reports offline.",
        epilog="Exit codes: 0 all good; 1 a verification failure; 2 usage error or missing keys; "
        "3 unreadable input or nothing to verify.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories to check")
    p.add_argument("--key", action="append", default=[], metavar="NAME=PUBKEY",
                   help="a public key file and whose it is (site id, or 'coordinator'); repeatable")
    p.add_argument("--keys-dir", type=Path, default=None, metavar="DIR",
                   help="load every DIR/*.pub; the name is the file name without .pub/.key.pub")
    p.add_argument("--coordinator-name", default=COORDINATOR, metavar="NAME",
                   help="key name that must sign consortium reports (default: coordinator)")
    p.add_argument("--version", action="version", version=version_line("fedsynth-verify"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (never a traceback for expected errors)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exc.code or 0)
    try:
        keys = load_keys(args.key, args.keys_dir)
    except _UsageError as exc:
        for problem in exc.problems:
            print(f"fedsynth-verify: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    results = verify_paths(args.paths, keys, coordinator=args.coordinator_name)
    for r in results:
        print("\n".join(r.lines()))
    counts = {s: sum(r.status == s for r in results) for s in ("OK", "FAIL", "UNREADABLE", "NOTE")}
    code = exit_code(results)
    if not counts["OK"] and not counts["FAIL"] and not counts["UNREADABLE"]:
        print("fedsynth-verify: nothing verifiable found", file=sys.stderr)
    print(
        f"summary: {counts['OK']} ok, {counts['FAIL']} failed, {counts['UNREADABLE']} unreadable, "
        f"{counts['NOTE']} notes; keys: {', '.join(f'{n}={key_id(k)}' for n, k in sorted(keys.items()))}; "
        f"exit {code}"
    )
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())

