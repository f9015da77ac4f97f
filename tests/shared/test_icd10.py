import pytest

from shared import icd10
from shared.errors import UnknownCodeError


@pytest.mark.parametrize(
    "raw, canon",
    [("F32", "F32"), ("f41.1", "F41.1"), ("F411", "F41.1"), (" F43.1 ", "F43.1"), ("F603", "F60.3")],
)
def test_normalize_dotted_and_undotted(raw, canon):
    assert icd10.normalize(raw) == canon


@pytest.mark.parametrize("bad", ["", "Z99.99", "F9", "V", "F30-F39", "hello"])
def test_unknown_codes_are_refused(bad):
    assert not icd10.is_code(bad)
    with pytest.raises(UnknownCodeError, match="unknown ICD-10 code"):
        icd10.normalize(bad)


def test_describe():
    assert icd10.describe("F411") == "Generalized anxiety disorder"


def test_normalize_all_lists_every_bad_code():
    with pytest.raises(UnknownCodeError) as err:
        icd10.normalize_all(["F32", "XX1", "F41.1", "Q"])
    assert len(err.value.problems) == 2
    assert "XX1" in str(err.value) and "'Q'" in str(err.value)


def test_chapter_f_codes_are_categories():
    codes = icd10.chapter_f_codes()
    assert "F32" in codes and "F41" in codes and all(c.startswith("F") for c in codes)


def test_catalogue_titles_cover_every_chapter():
    titles = icd10.catalogue_titles()
    assert len(titles) > 10_000 and titles == sorted(set(titles))
    for code in ("A00.0", "F41.1", "I10", "E11.9", "J45.9", "Z99.9"):
        assert icd10.describe(code) in titles
    assert "Certain infectious and parasitic diseases" in titles  # a chapter's title
