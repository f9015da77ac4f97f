"""Notes ingestion: a site's private notes export (JSONL or CSV) read and validated.

One note per record with the fields ``note_id``, ``patient_id``, ``icd10`` (one
WHO ICD-10 code or a list, dotted or not; in CSV a list is ``;``-separated),
``text``, optional ``date`` and optional ``identifiers`` (PHI strings known for
the patient, used only by PHI-echo checks; in CSV ``;``-separated).

The file is streamed: bytes are read line by line, each line with a bound
(:func:`max_line_bytes`), and decoded per line, so one non-UTF-8 byte or one
huge line costs one record, not the file (nor the memory). Problems name the
field, line and reason but never a field's value: notes are PHI and problems go
to logs. Every bad record is reported as a
:class:`~shared.errors.Problem` with its 1-based line number and reason; nothing
is dropped silently. The unit of privacy is the patient: the train/held-out
split (:mod:`client.patient_split`) never puts one patient on both sides.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from shared import icd10
from shared.errors import ConfigError, InputError, Problem

__all__ = [
    "Note",
    "NotesLoad",
    "NotesSummary",
    "iter_records",
    "load_notes",
    "summarize",
]

REQUIRED_FIELDS = ("note_id", "patient_id", "icd10", "text")
OPTIONAL_FIELDS = ("date", "identifiers")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_CSV_SUFFIXES = {".csv"}


@dataclass(frozen=True)
class Note:
    """One validated private note. ``icd10`` holds canonical codes; the first is the primary."""

    note_id: str
    patient_id: str
    icd10: tuple[str, ...]
    text: str
    date: str | None = None
    identifiers: tuple[str, ...] = ()
    source: str = ""
    line: int = 0

    @property
    def primary_code(self) -> str:
        """The code a report about this note is conditioned on."""
        return self.icd10[0]


@dataclass(frozen=True)
class NotesLoad:
    """The good notes of one file, every problem found, and how many records were skipped."""

    notes: list[Note]
    problems: list[Problem]
    skipped: int
    path: Path


@dataclass(frozen=True)
class NotesSummary:
    """Counts and word-length statistics (whitespace-separated words) of a set of notes.

    Computed from private notes: for local display and checks only, not a wire value.
    ``codes`` counts notes per primary code.
    """

    notes: int
    patients: int
    codes: dict[str, int]
    length_words_mean: float
    length_words_p50: float
    length_words_max: int
    notes_per_patient_max: int


# --------------------------------------------------------------------------- reading


def max_line_bytes(max_chars: int) -> int:
    """The longest physical line read into memory, in bytes, for notes of ``max_chars`` characters.

    A character is at most 4 UTF-8 bytes, or 12 as a JSON ``\\uXXXX`` surrogate pair;
    64 KiB covers the other fields. A longer line is skipped unread (and reported),
    so one huge line costs this much memory, not its own size.
    """
    return 12 * max_chars + 64 * 1024


def _bounded_lines(fh: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """Physical lines of ``fh``, each read with at most ``limit`` bytes; None for a longer one."""
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):  # drain the rest of the line in bounded chunks
            raw = fh.readline(limit + 1)
        yield None


def _decoded_lines(path: Path, bad_lines: dict[int, str], max_bytes: int) -> Iterator[str]:
    """Physical lines of ``path`` decoded one at a time; undecodable or overlong lines noted in
    ``bad_lines`` (and yielded empty)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(_bounded_lines(fh, max_bytes), start=1):
            if raw is None:
                bad_lines[number] = f"line longer than {max_bytes} bytes (not read; the longest note is " \
                                    "max_chars characters)"
                yield "\n"
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # spreadsheet exports often start with a UTF-8 byte-order mark
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_lines[number] = (
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
                )
                yield raw.decode("utf-8", errors="replace")


def _str_field(rec: dict[str, Any], name: str, reasons: list[str]) -> str | None:
    value = rec[name]
    if not isinstance(value, str):
        reasons.append(f"field {name!r} must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        reasons.append(f"empty {name}")
        return None
    return value.strip()


def _str_list(value: Any, name: str, reasons: list[str], *, split_csv: bool) -> list[str] | None:
    if isinstance(value, str) and split_csv:
        return [part.strip() for part in value.split(";") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    got = "a list with non-string items" if isinstance(value, list) else type(value).__name__
    reasons.append(f"field {name!r} must be a string or a list of strings, got {got}")
    return None


def _validate(
    rec: dict[str, Any], *, where: str, line: int, max_chars: int, csv_mode: bool
) -> Note | list[str]:
    """A :class:`Note` from one record, or every reason it is not one."""
    reasons: list[str] = []
    missing = [f for f in REQUIRED_FIELDS if f not in rec or rec[f] is None]
    if missing:
        reasons.append("missing field" + ("s " if len(missing) > 1 else " ") + ", ".join(map(repr, missing)))
    unknown = [k for k in rec if k not in ALL_FIELDS]
    if unknown:  # names are not echoed: a malformed export can put note text in a key
        reasons.append(f"{len(unknown)} unknown field(s) (allowed: {', '.join(ALL_FIELDS)})")

    note_id = _str_field(rec, "note_id", reasons) if "note_id" not in missing else None
    patient_id = _str_field(rec, "patient_id", reasons) if "patient_id" not in missing else None

    codes: list[str] = []
    if "icd10" not in missing:
        raw = rec["icd10"]
        raw_codes = [raw] if isinstance(raw, str) and not csv_mode else raw
        listed = _str_list(raw_codes, "icd10", reasons, split_csv=csv_mode)
        if listed is not None and not listed:
            reasons.append("empty icd10")
        for k, code in enumerate(listed or [], start=1):
            if not icd10.is_code(code):  # the value is never echoed (it may be note text)
                reasons.append(f"icd10 item {k} is not a known ICD-10 code ({len(code)} characters"
                               + (", looks like note text: icd10 and text swapped?)" if len(code) > 16 else ")"))
            elif (canon := icd10.normalize(code)) not in codes:
                codes.append(canon)

    text = None
    if "text" not in missing:
        value = rec["text"]
        if not isinstance(value, str):
            reasons.append(f"field 'text' must be a string, got {type(value).__name__}")
        elif not value.strip():
            reasons.append("empty text")
        elif len(value) > max_chars:
            reasons.append(f"text too long: {len(value)} characters (max {max_chars})")
        else:
            text = value

    date = rec.get("date")
    if date is not None and not isinstance(date, str):
        reasons.append(f"field 'date' must be a string, got {type(date).__name__}")
    date = (date.strip() or None) if isinstance(date, str) else None

    identifiers: list[str] = []
    if (raw_ids := rec.get("identifiers")) is not None:
        raw_ids = [raw_ids] if isinstance(raw_ids, str) and not csv_mode else raw_ids
        identifiers = _str_list(raw_ids, "identifiers", reasons, split_csv=csv_mode) or []

    if reasons:
        return reasons
    return Note(
        note_id=note_id or "",
        patient_id=patient_id or "",
        icd10=tuple(codes),
        text=text or "",
        date=date,
        identifiers=tuple(dict.fromkeys(identifiers)),
        source=where,
        line=line,
    )


def _jsonl_records(
    path: Path, bad_lines: dict[int, str], max_bytes: int
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line, record or reason) for every non-blank line of a JSONL file."""
    for number, text in enumerate(_decoded_lines(path, bad_lines, max_bytes), start=1):
        if number in bad_lines:
            yield number, bad_lines[number]
            continue
        if not text.strip():
            continue  # a blank line carries no record
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, f"invalid JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield number, f"not a JSON object (got {type(obj).__name__})"
            continue
        yield number, obj


def _csv_records(
    path: Path, bad_lines: dict[int, str], where: str, max_bytes: int
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(first line, record or reason) for every row of a CSV file with a header row."""
    reader = csv.reader(_decoded_lines(path, bad_lines, max_bytes), strict=True)
    header: list[str] | None = None
    last = 0
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last = reader.line_num
            yield start, f"invalid CSV ({exc})"
            continue
        end, last = reader.line_num, reader.line_num
        undecodable = [n for n in range(start, end + 1) if n in bad_lines]
        if header is None:
            if undecodable or not row:
                raise InputError(f"{where}: unreadable CSV header", [
                    Problem(where, bad_lines.get(start, "empty header row"), start)])
            header = [h.strip().lstrip("\ufeff") for h in row]
            problems = [Problem(where, f"CSV header lacks column {f!r}", start)
                        for f in REQUIRED_FIELDS if f not in header]
            # column names are not echoed: a file without a header row has note text there
            problems += [Problem(where, f"unknown CSV column {k} (allowed: {', '.join(ALL_FIELDS)})", start)
                         for k, h in enumerate(header, start=1) if h not in ALL_FIELDS]
            if len(set(header)) != len(header):
                problems.append(Problem(where, "CSV header repeats a column", start))
            if problems:
                raise InputError(f"{where}: bad CSV header", problems)
            continue
        if undecodable:
            yield undecodable[0], bad_lines[undecodable[0]]
            continue
        if not any(cell.strip() for cell in row):
            continue  # a blank line carries no record
        if len(row) != len(header):
            yield start, f"expected {len(header)} CSV fields, found {len(row)}"
            continue
        rec: dict[str, Any] = dict(zip(header, row, strict=True))
        for opt in OPTIONAL_FIELDS:
            if opt in rec and not rec[opt].strip():
                rec[opt] = None
        yield start, rec


def iter_records(path: Path, *, max_chars: int = 20_000) -> Iterator[Note | Problem]:
    """Stream ``path`` (``.jsonl``/``.ndjson`` or ``.csv``), yielding a Note or a Problem per record.

    ``max_chars`` is the longest accepted note text, in characters. A missing or
    unreadable file, an unknown extension or a bad CSV header raises
    :class:`InputError` (the first two before anything is yielded); an empty file
    yields one Problem.
    """
    path = Path(path)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ConfigError(f"max_chars must be a positive integer, got {max_chars!r}")
    suffix = path.suffix.lower()
    if suffix not in _JSONL_SUFFIXES | _CSV_SUFFIXES:
        raise InputError(f"{path}: unknown notes file type {suffix or '(none)'!r} (expected .jsonl or .csv)")
    if not path.is_file():
        raise InputError(f"{path}: notes file not found (or not a regular file)")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise InputError(f"{path}: cannot read notes file ({exc.strerror})") from None
    return _iter(path, max_chars=max_chars, csv_mode=suffix in _CSV_SUFFIXES)


def _iter(path: Path, *, max_chars: int, csv_mode: bool) -> Iterator[Note | Problem]:
    where = str(path)
    bad_lines: dict[int, str] = {}
    first_line: dict[str, int] = {}  # note_id -> line of first occurrence
    limit = max_line_bytes(max_chars)
    records = (_csv_records(path, bad_lines, where, limit) if csv_mode
               else _jsonl_records(path, bad_lines, limit))
    seen_any = False
    for line, rec in records:
        seen_any = True
        if isinstance(rec, str):
            yield Problem(where, rec, line)
            continue
        result = _validate(rec, where=where, line=line, max_chars=max_chars, csv_mode=csv_mode)
        note_id = rec.get("note_id")
        reasons = result if isinstance(result, list) else []
        if isinstance(note_id, str) and note_id.strip():
            key = note_id.strip()
            if key in first_line:
                reasons = reasons + [f"duplicate note_id (first on line {first_line[key]})"]
            else:
                first_line[key] = line
        if reasons:
            yield Problem(where, "; ".join(reasons), line)
        else:
            yield result  # type: ignore[misc]
    if not seen_any:
        yield Problem(where, "empty file (no notes)", None)


def load_notes(
    path: Path, *, mode: Literal["strict", "skip"] = "strict", max_chars: int = 20_000
) -> NotesLoad:
    """Read and validate a notes file.

    ``strict``: the whole file is validated, then one :class:`InputError` lists
    every bad record. ``skip``: bad records are left out and returned as
    ``problems`` (``skipped`` counts them). In both modes a file with no good
    note at all raises, since nothing could be trained or evaluated on it.
    """
    if mode not in ("strict", "skip"):
        raise ConfigError(f"notes mode must be 'strict' or 'skip', got {mode!r}")
    path = Path(path)
    notes: list[Note] = []
    problems: list[Problem] = []
    for item in iter_records(path, max_chars=max_chars):
        (problems if isinstance(item, Problem) else notes).append(item)  # type: ignore[arg-type]
    if problems and (mode == "strict" or not notes):
        raise InputError(f"{path}: {len(problems)} bad record(s) in notes file", problems)
    skipped = sum(1 for p in problems if p.line is not None)
    return NotesLoad(notes=notes, problems=problems, skipped=skipped, path=path)


def summarize(notes: Sequence[Note]) -> NotesSummary:
    """Counts and word lengths of ``notes`` (all zeros for no notes)."""
    lengths = [len(n.text.split()) for n in notes]
    per_patient = Counter(n.patient_id for n in notes)
    codes = Counter(n.primary_code for n in notes)
    return NotesSummary(
        notes=len(notes),
        patients=len(per_patient),
        codes=dict(sorted(codes.items())),
        length_words_mean=float(statistics.fmean(lengths)) if lengths else 0.0,
        length_words_p50=float(statistics.median(lengths)) if lengths else 0.0,
        length_words_max=max(lengths, default=0),
        notes_per_patient_max=max(per_patient.values(), default=0),
    )
