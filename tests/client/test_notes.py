import json

import pytest

from client.notes import Note, iter_records, load_notes, summarize
from client.patient_split import group_by_patient
from shared.errors import ConfigError, InputError, Problem


def _rec(i, patient="p1", code="F32.1", text="Low mood for weeks.", **extra):
    return {"note_id": f"n{i}", "patient_id": patient, "icd10": code, "text": text, **extra}


def _jsonl(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = [
    json.dumps(_rec(1, "p1", "F321", "one two three")),
    json.dumps(_rec(2, "p1", ["f41.1", "F32.1"], "one two three four five", identifiers=["Jane Roe"])),
    json.dumps(_rec(3, "p2", "F41.1", "a b", date="2024-01-02")),
    json.dumps(_rec(4, "p3", "F43.1", "w " * 10)),
]


def test_good_jsonl_loads_with_canonical_codes(tmp_path):
    path = _jsonl(tmp_path / "notes.jsonl", GOOD)
    load = load_notes(path)
    assert load.problems == [] and load.skipped == 0 and load.path == path
    assert [n.note_id for n in load.notes] == ["n1", "n2", "n3", "n4"]
    n1, n2, n3, _ = load.notes
    assert n1.icd10 == ("F32.1",) and n1.primary_code == "F32.1"
    assert n2.icd10 == ("F41.1", "F32.1") and n2.primary_code == "F41.1"
    assert n2.identifiers == ("Jane Roe",) and n1.identifiers == ()
    assert n3.date == "2024-01-02" and n1.date is None
    assert n3.line == 3 and n3.source == str(path)


# Each bad line and the exact reason it must be reported with.
BAD_CASES = [
    ("{not json", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "not a JSON object (got list)"),
    (json.dumps({"note_id": "x", "patient_id": "p", "icd10": "F32"}), "missing field 'text'"),
    (json.dumps({"note_id": "x", "icd10": "F32"}), "missing fields 'patient_id', 'text'"),
    (json.dumps(_rec(9) | {"note_id": 7}), "field 'note_id' must be a string, got int"),
    (json.dumps(_rec(9, code="Z99.99")), "icd10 item 1 is not a known ICD-10 code (6 characters)"),
    (json.dumps(_rec(9, code=["F32", 3])), "field 'icd10' must be a string or a list of strings, got a list with non-string items"),
    (json.dumps(_rec(9, text="   ")), "empty text"),
    (json.dumps(_rec(9, text="x" * 51)), "text too long: 51 characters (max 50)"),
    (json.dumps(_rec(9) | {"identifers": ["typo"]}), "1 unknown field(s) (allowed: note_id, patient_id, icd10, text, date, identifiers)"),
    (json.dumps(_rec(9, date=20240101)), "field 'date' must be a string, got int"),
]


@pytest.mark.parametrize("line, reason", BAD_CASES)
def test_each_bad_line_gets_its_line_number_and_reason(tmp_path, line, reason):
    path = _jsonl(tmp_path / "notes.jsonl", [GOOD[0], line, GOOD[2]])
    items = list(iter_records(path, max_chars=50))
    assert items[1] == Problem(str(path), reason, 2)
    assert isinstance(items[0], Note) and isinstance(items[2], Note)


def test_non_utf8_bytes_cost_only_their_line(tmp_path):
    bad = b'{"note_id": "n9", "patient_id": "p9", "icd10": "F32", "text": "caf\xe9"}'
    path = _jsonl(tmp_path / "notes.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2]])
    load = load_notes(path, mode="skip")
    assert [n.note_id for n in load.notes] == ["n1", "n2", "n3"]
    assert load.problems == [Problem(str(path), f"not valid UTF-8 (byte 0xe9 at byte {bad.index(0xE9) + 1} of the line)", 3)]


def test_duplicate_note_id_names_the_first_line(tmp_path):
    path = _jsonl(tmp_path / "notes.jsonl", [GOOD[0], GOOD[1], json.dumps(_rec(1, "p7"))])
    load = load_notes(path, mode="skip")
    assert load.problems == [Problem(str(path), "duplicate note_id (first on line 1)", 3)]
    assert load.skipped == 1


def test_strict_raises_once_listing_every_problem(tmp_path):
    lines = [GOOD[0], "{oops", GOOD[1], json.dumps(_rec(5, code="XX")), "", json.dumps(_rec(6, text=""))]
    path = _jsonl(tmp_path / "notes.jsonl", lines)
    with pytest.raises(InputError) as err:
        load_notes(path, mode="strict")
    assert [p.line for p in err.value.problems] == [2, 4, 6]
    msg = str(err.value)
    assert f"{path}:2: invalid JSON" in msg and "icd10 item 1 is not a known ICD-10 code (2 characters)" in msg and f"{path}:6: empty text" in msg


def test_skip_returns_good_notes_and_counts_the_rest(tmp_path):
    lines = [GOOD[0], "{oops", GOOD[1], json.dumps(_rec(5, code="XX")), "", json.dumps(_rec(6, text=""))]
    load = load_notes(_jsonl(tmp_path / "notes.jsonl", lines), mode="skip")
    assert [n.note_id for n in load.notes] == ["n1", "n2"]
    assert load.skipped == 3 and len(load.problems) == 3


def test_several_reasons_on_one_line_are_all_named(tmp_path):
    path = _jsonl(tmp_path / "n.jsonl", [json.dumps({"note_id": "", "patient_id": "p", "icd10": "F99.9", "text": ""})])
    with pytest.raises(InputError) as err:
        load_notes(path)
    (problem,) = err.value.problems
    assert problem.reason == "empty note_id; icd10 item 1 is not a known ICD-10 code (5 characters); empty text"


def test_empty_file_missing_file_unknown_extension(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    for mode in ("strict", "skip"):
        with pytest.raises(InputError, match="empty file"):
            load_notes(empty, mode=mode)
    with pytest.raises(InputError, match="not found") as err:
        load_notes(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in str(err.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unknown notes file type '.txt'"):
        iter_records(tmp_path / "notes.txt")
    with pytest.raises(ConfigError):
        load_notes(empty, mode="lenient")  # type: ignore[arg-type]


def test_iter_records_streams(tmp_path):
    path = _jsonl(tmp_path / "notes.jsonl", GOOD + ["{broken"])
    it = iter_records(path)
    first = next(it)
    assert isinstance(first, Note) and first.note_id == "n1"  # yielded before the bad line is read


CSV_TEXT = (
    "note_id,patient_id,icd10,text,date,identifiers\n"
    'c1,p1,F321,"Two\nlines here",2024-01-01,Jane Roe;MRN 123\n'
    "c2,p2,F41.1;f32.1,plain text,,\n"
    "c3,p2,Q,unknown code,,\n"
    "c4,p3,F43.1,,,\n"
    "c5,p3,F43.1,too,many,fields,here\n"
)


def test_csv_same_columns_lists_and_multiline_text(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text(CSV_TEXT, encoding="utf-8")
    load = load_notes(path, mode="skip")
    c1, c2 = load.notes
    assert c1.text == "Two\nlines here" and c1.icd10 == ("F32.1",) and c1.identifiers == ("Jane Roe", "MRN 123")
    assert c1.date == "2024-01-01" and c1.line == 2
    assert c2.icd10 == ("F41.1", "F32.1") and c2.date is None and c2.identifiers == () and c2.line == 4
    assert load.problems == [
        Problem(str(path), "icd10 item 1 is not a known ICD-10 code (1 characters)", 5),
        Problem(str(path), "empty text", 6),
        Problem(str(path), "expected 6 CSV fields, found 7", 7),
    ]
    assert load.skipped == 3


def test_csv_non_utf8_and_bad_header(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b"note_id,patient_id,icd10,text\nc1,p1,F32,ok\nc2,p1,F32,caf\xff\nc3,p2,F32,fine\n")
    load = load_notes(path, mode="skip")
    assert [n.note_id for n in load.notes] == ["c1", "c3"]
    assert load.problems == [Problem(str(path), "not valid UTF-8 (byte 0xff at byte 14 of the line)", 3)]

    bad = tmp_path / "bad.csv"
    bad.write_text("note_id,patient,icd10,text\nc1,p1,F32,x\n")
    with pytest.raises(InputError) as err:
        load_notes(bad, mode="skip")
    assert "CSV header lacks column 'patient_id'" in str(err.value) and "unknown CSV column 2" in str(err.value)


def test_same_patient_with_different_identifiers_is_fine(tmp_path):
    lines = [json.dumps(_rec(1, "p1", identifiers=["A"])), json.dumps(_rec(2, "p1", identifiers=["B", "A"]))]
    load = load_notes(_jsonl(tmp_path / "n.jsonl", lines))
    assert [n.identifiers for n in load.notes] == [("A",), ("B", "A")]


def test_group_and_summary_on_a_known_file(tmp_path):
    load = load_notes(_jsonl(tmp_path / "n.jsonl", GOOD))
    groups = group_by_patient(load.notes)
    assert {p: [n.note_id for n in ns] for p, ns in groups.items()} == {
        "p1": ["n1", "n2"], "p2": ["n3"], "p3": ["n4"]
    }
    s = summarize(load.notes)
    assert (s.notes, s.patients) == (4, 3)
    assert s.codes == {"F32.1": 1, "F41.1": 2, "F43.1": 1}  # by primary code
    assert s.length_words_mean == pytest.approx((3 + 5 + 2 + 10) / 4)
    assert s.length_words_p50 == 4.0 and s.length_words_max == 10 and s.notes_per_patient_max == 2
    assert summarize([]).notes == 0


SWAPPED_TEXT = "Patient Jane Roe (MRN 4417) reports low mood since her divorce in March"


def test_problems_never_carry_field_values(tmp_path):
    # icd10 and text swapped, an unknown key holding text, a duplicate id: none may be echoed
    lines = [json.dumps({"note_id": "n1", "patient_id": "Jane Roe", "icd10": SWAPPED_TEXT, "text": "F32.1"}),
             json.dumps(_rec(2) | {SWAPPED_TEXT: "x"}),
             json.dumps(_rec(2, "Jane Roe"))]
    path = _jsonl(tmp_path / "notes.jsonl", lines)
    with pytest.raises(InputError) as err:
        load_notes(path)
    shown = str(err.value) + repr(err.value.problems)
    assert "swapped" in shown and len(err.value.problems) == 3
    for secret in ("Jane", "4417", "divorce", "n2", "Roe"):
        assert secret not in shown
    headerless = tmp_path / "notes.csv"
    headerless.write_text(f"n1,p1,F32.1,{SWAPPED_TEXT}\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_notes(headerless)
    assert "Jane" not in str(err.value) + repr(err.value.problems)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_overlong_line_is_skipped_without_reading_it_whole(tmp_path, suffix, monkeypatch):
    import client.notes as notes_mod

    head = "note_id,patient_id,icd10,text\n" if suffix == ".csv" else ""
    good = "n1,p1,F32.1,fine\n" if suffix == ".csv" else json.dumps(_rec(1)) + "\n"
    good3 = "n3,p3,F32.1,also fine\n" if suffix == ".csv" else json.dumps(_rec(3, "p3")) + "\n"
    path = tmp_path / f"notes{suffix}"
    limit = notes_mod.max_line_bytes(50)
    path.write_text(head + good + "x" * (limit * 5) + "\n" + good3, encoding="utf-8")
    sizes = []
    real = notes_mod._bounded_lines

    def spy(fh, lim):
        orig = fh.readline

        def readline(n=-1):
            assert 0 < n <= lim + 1, "unbounded read"
            got = orig(n)
            sizes.append(len(got))
            return got

        fh.readline = readline
        return real(fh, lim)

    monkeypatch.setattr(notes_mod, "_bounded_lines", spy)
    load = load_notes(path, mode="skip", max_chars=50)
    assert [n.note_id for n in load.notes] == ["n1", "n3"]
    (problem,) = load.problems
    assert "line longer than" in problem.reason and problem.line == (3 if suffix == ".csv" else 2)
    assert max(sizes) <= limit + 1
