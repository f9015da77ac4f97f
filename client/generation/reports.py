"""A synthetic report with its provenance, and the local JSONL file that holds reports.

Reports stay on the site: :func:`write_reports` writes them (owner-only, atomically)
and :func:`read_reports` reads them back, or plain ``{"icd10", "text"}`` lines from
any other generator, for evaluation. Only metric summaries computed from them ever
cross the wire.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared import icd10
from shared.atomic import PRIVATE, write_atomic
from shared.errors import InputError, Problem

SETTINGS = ("zero-shot", "adapter")


@dataclass(frozen=True)
class SyntheticReport:
    """One generated report and its provenance (stays on site)."""

    report_id: str
    code: str
    text: str
    setting: str
    model_id: str
    adapter_hash: str | None
    sampling: dict
    seed: int


def write_reports(reports: Sequence[SyntheticReport], path: Path) -> None:
    """Write reports as JSONL (one report with its provenance per line), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(dataclasses.asdict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in reports)
    write_atomic(path, "".join(lines), mode=PRIVATE)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "report_id": (str,),
    "code": (str,),
    "text": (str,),
    "setting": (str,),
    "model_id": (str,),
    "adapter_hash": (str, type(None)),
    "sampling": (dict,),
    "seed": (int,),
}


# At most this many line problems are listed (the rest are counted).
MAX_LINE_PROBLEMS = 20
# The plain report format: just the code and the text (reports from any other generator).
PLAIN_FIELDS = ("icd10", "text")
PLAIN_OPTIONAL = ("report_id",)
_FORMAT_HINT = (
    'expected {"icd10": "F32.1", "text": "..."} (plain) or a line written by `fedsynth-site '
    'generate` with fields ' + ", ".join(_FIELD_TYPES)
)


def _parse_plain(obj: dict, where: str, lineno: int) -> tuple[SyntheticReport | None, list[str]]:
    """A plain ``{"icd10": code or [codes], "text": ..., "report_id"?: ...}`` report."""
    reasons = [f"unknown field {k!r} in a plain report" for k in obj if k not in PLAIN_FIELDS + PLAIN_OPTIONAL]
    code = obj.get("icd10")
    if isinstance(code, list) and code and all(isinstance(c, str) for c in code):
        code = code[0]  # the first code is the primary, as in a notes file
    if not isinstance(code, str):
        reasons.append("field 'icd10' must be a code or a non-empty list of codes")
    elif not icd10.is_code(code):
        reasons.append(f"unknown ICD-10 code {code!r}")
    if not isinstance(obj.get("text"), str):
        reasons.append("field 'text' must be a string")
    rid = obj.get("report_id", f"{where}:{lineno}")
    if not isinstance(rid, str) or not rid.strip():
        reasons.append("field 'report_id' must be a non-empty string")
    if reasons:
        return None, reasons
    return SyntheticReport(report_id=rid, code=icd10.normalize(code), text=obj["text"], setting="zero-shot",
                           model_id=f"plain:{where}", adapter_hash=None, sampling={}, seed=0), []


def _parse_line(raw: str, where: str = "", lineno: int = 0) -> tuple[SyntheticReport | None, list[str]]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"invalid JSON: {exc.msg}"]
    if not isinstance(obj, dict):
        return None, ["not a JSON object"]
    if "icd10" in obj and "code" not in obj:
        report, reasons = _parse_plain(obj, where, lineno)
    else:
        reasons = [f"missing field {k!r}" for k in _FIELD_TYPES if k not in obj]
        reasons += [f"unknown field {k!r}" for k in obj if k not in _FIELD_TYPES]
        for k, types in _FIELD_TYPES.items():
            if k in obj and (not isinstance(obj[k], types) or isinstance(obj[k], bool)):
                reasons.append(f"field {k!r} has wrong type {type(obj[k]).__name__}")
        if not reasons:
            if obj["setting"] not in SETTINGS:
                reasons.append(f"setting must be one of {SETTINGS}, got {obj['setting']!r}")
            if not icd10.is_code(obj["code"]):
                reasons.append(f"unknown ICD-10 code {obj['code']!r}")
        report = None
        if not reasons:
            obj["code"] = icd10.normalize(obj["code"])
            report = SyntheticReport(**obj)
    if report is not None and not report.text.strip():
        return None, ["field 'text' is empty (an empty report is never evaluated or released)"]
    return report, reasons


def read_reports(path: Path) -> list[SyntheticReport]:
    """Read a JSONL reports file: lines written by :func:`write_reports`, or plain
    ``{"icd10": "F32.1", "text": "..."}`` lines (optional ``report_id``, default
    ``<file>:<line>``; ``icd10`` may be a list, the first code is the primary) from
    any other generator. Both may be mixed.

    Blank lines are ignored; a report with empty text is refused; every bad line is
    reported (file and line number) in one :class:`InputError`, which ends with the
    expected format when any line was bad.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read reports file {path}", [Problem(str(path), str(exc))]) from None
    reports: list[SyntheticReport] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        try:
            raw = line.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(str(path), "not valid UTF-8", lineno))
            continue
        if not raw.strip():
            continue
        report, reasons = _parse_line(raw, path.name, lineno)
        problems += [Problem(str(path), reason, lineno) for reason in reasons]
        if report is not None:
            reports.append(report)
    if problems:
        if len(problems) > MAX_LINE_PROBLEMS:
            more = len(problems) - MAX_LINE_PROBLEMS
            problems = problems[:MAX_LINE_PROBLEMS] + [Problem(str(path), f"... and {more} more problems")]
        raise InputError(f"invalid reports file {path} ({_FORMAT_HINT})", problems)
    return reports
