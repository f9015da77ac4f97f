"""Issuing and reading privacy reports: JSON (atomically), its Ed25519 ``.sig``, the HTML page.

Writers: the site (client/privacy_report.py) and the coordinator (server/report.py)
issue with :func:`issue_report`; ``fedsynth-verify`` and the tests read with
:func:`parse_report`/:func:`read_report`, which refuse anything that is not exactly
one of the published schemas (:func:`write_schemas`). The documents themselves:
:mod:`shared.report` (the site's) and :mod:`shared.report_consortium`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from shared.atomic import write_atomic
from shared.errors import InputError, Problem
from shared.report import SiteRoundReport, Software
from shared.report_consortium import ConsortiumReport
from shared.signing import sign_file, signature_path

REPORT_TYPES: dict[str, type[BaseModel]] = {
    "site_round": SiteRoundReport,
    "consortium": ConsortiumReport,
}
Report = TypeVar("Report", SiteRoundReport, ConsortiumReport)


def software_versions() -> Software:
    """Installed versions of the libraries a report depends on ("not installed" when absent)."""
    def v(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return Software(
        fedsynth=v("fedsynth"), torch=v("torch"), transformers=v("transformers"),
        peft=v("peft"), opacus=v("opacus"), flwr=v("flwr"),
    )


def write_schemas(directory: Path) -> list[Path]:
    """Export the JSON Schemas (``<report_type>.schema.json``) auditors can validate against."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, cls in REPORT_TYPES.items():
        path = directory / f"{name.replace('_', '-')}-report.schema.json"
        schema = cls.model_json_schema(mode="serialization")
        schema["$id"] = f"https://fedsynth.invalid/schemas/{path.name}"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        out.append(path)
    return out


def write_report(report: BaseModel, path_json: Path, *, key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``report`` as JSON (atomically, fsynced); with ``key`` also ``<path>.sig``."""
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path_json, report.model_dump_json(indent=2) + "\n")
    if key is not None:
        sign_file(path_json, key)
    return path_json


@dataclass(frozen=True)
class IssuedReport(Generic[Report]):
    """Where a report was written: JSON, its ``.sig`` (None without a key) and its HTML page."""

    report: Report
    json_path: Path
    signature: Path | None
    html_path: Path


def issue_report(
    report: Report, path_json: Path, *, key: Ed25519PrivateKey | None, html: str
) -> IssuedReport[Report]:
    """Write ``report`` (JSON, signed with ``key``) and its ``html`` page beside it, each atomically.

    Without a key a ``.sig`` left by an earlier write of the same path is removed: it would
    no longer match the new bytes and the trail would fail verification.
    """
    path = write_report(report, path_json, key=key)
    sig = signature_path(path)
    if key is None:
        sig.unlink(missing_ok=True)
    html_path = write_atomic(path.with_suffix(".html"), html)
    return IssuedReport(report, path, sig if key is not None else None, html_path)


def _problems(path: Path, exc: ValidationError) -> list[Problem]:
    return [
        Problem(f"{path}: {'.'.join(str(p) for p in err['loc']) or '<root>'}", err["msg"])
        for err in exc.errors()
    ]


def parse_report(path: Path, data: bytes, cls: type[Report] | None = None) -> Report:
    """Validate JSON ``data`` (read from ``path``) as ``cls``, or as the type its report_type names."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError("report is not valid JSON", [Problem(str(path), str(exc))]) from None
    if cls is None:
        rtype = obj.get("report_type") if isinstance(obj, dict) else None
        if rtype not in REPORT_TYPES:
            raise InputError(
                "unknown report type",
                [Problem(f"{path}: report_type", f"{rtype!r} not one of {sorted(REPORT_TYPES)}")],
            )
        cls = REPORT_TYPES[rtype]  # type: ignore[assignment]
    try:
        return cls.model_validate(obj)  # type: ignore[union-attr]
    except ValidationError as exc:
        raise InputError(f"{path}: not a valid {cls.__name__}", _problems(path, exc)) from None


def read_report(path: Path, cls: type[Report]) -> Report:
    """Read and validate a report; InputError listing file and field paths on failure."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError("cannot read report", [Problem(str(path), exc.strerror or str(exc))]) from None
    return parse_report(path, data, cls)
