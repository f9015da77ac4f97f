import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.errors import ConfigError
from shared.settings import CoordinatorSettings, SiteSettings, cache_dir, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No FEDSYNTH_* variable and no .env from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith(("FEDSYNTH_SITE_", "FEDSYNTH_COORD_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults():
    s = load_settings(SiteSettings)
    assert s.site_id == "site" and s.notes_mode == "strict" and s.epsilon_ceiling == 8.0
    assert s.delta is None and s.k_min == 10 and s.heldout_fraction == 0.2
    assert s.ledger_path == Path("site-output") / "privacy-ledger.jsonl"


def test_site_settings_from_env(monkeypatch, tmp_path):
    env = {
        "FEDSYNTH_SITE_SITE_ID": "hospital-a",
        "FEDSYNTH_SITE_NOTES_PATH": str(tmp_path / "notes.csv"),
        "FEDSYNTH_SITE_NOTES_MODE": "skip",
        "FEDSYNTH_SITE_OUTPUT_DIR": str(tmp_path / "out"),
        "FEDSYNTH_SITE_EPSILON_CEILING": "4.5",
        "FEDSYNTH_SITE_DELTA": "1e-6",
        "FEDSYNTH_SITE_DEVICE": "cpu",
        "FEDSYNTH_SITE_K_MIN": "20",
        "FEDSYNTH_SITE_SPLIT_SEED": "3",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings(SiteSettings)
    assert s.site_id == "hospital-a" and s.notes_path == tmp_path / "notes.csv"
    assert s.notes_mode == "skip" and s.epsilon_ceiling == 4.5 and s.delta == 1e-6
    assert s.k_min == 20 and s.split_seed == 3 and s.resolved_device() == "cpu"
    assert s.ledger_path == tmp_path / "out" / "privacy-ledger.jsonl"

    monkeypatch.setenv("FEDSYNTH_SITE_LEDGER_PATH", str(tmp_path / "elsewhere.jsonl"))
    assert load_settings(SiteSettings).ledger_path == tmp_path / "elsewhere.jsonl"


def test_overrides_beat_env_and_none_is_ignored(monkeypatch):
    monkeypatch.setenv("FEDSYNTH_SITE_EPSILON_CEILING", "4")
    assert load_settings(SiteSettings, epsilon_ceiling=2.0).epsilon_ceiling == 2.0
    assert load_settings(SiteSettings, epsilon_ceiling=None).epsilon_ceiling == 4.0


def test_several_bad_values_give_one_error_listing_each(monkeypatch):
    monkeypatch.setenv("FEDSYNTH_SITE_EPSILON_CEILING", "-1")
    monkeypatch.setenv("FEDSYNTH_SITE_NOTES_MODE", "lenient")
    monkeypatch.setenv("FEDSYNTH_SITE_SITE_ID", "bad id!")
    monkeypatch.setenv("FEDSYNTH_SITE_DELTA", "2")
    monkeypatch.setenv("FEDSYNTH_SITE_K_MIN", "1")
    with pytest.raises(ConfigError) as err:
        load_settings(SiteSettings)
    names = sorted(p.where for p in err.value.problems)
    assert names == [
        "FEDSYNTH_SITE_DELTA",
        "FEDSYNTH_SITE_EPSILON_CEILING",
        "FEDSYNTH_SITE_K_MIN",
        "FEDSYNTH_SITE_NOTES_MODE",
        "FEDSYNTH_SITE_SITE_ID",
    ]
    assert str(err.value).startswith("invalid SiteSettings")
    assert err.value.exit_code == 2


def test_require_secagg_defaults_off_and_reads_the_env(monkeypatch):
    # Off by default so the CPU demo's plain rounds run; a deployment's env file turns it on.
    assert load_settings(SiteSettings).require_secagg is False
    for value in ("true", "True", "1"):
        monkeypatch.setenv("FEDSYNTH_SITE_REQUIRE_SECAGG", value)
        assert load_settings(SiteSettings).require_secagg is True
    monkeypatch.setenv("FEDSYNTH_SITE_REQUIRE_SECAGG", "false")
    assert load_settings(SiteSettings).require_secagg is False
    # A typo must not silently mean "plain rounds allowed".
    monkeypatch.setenv("FEDSYNTH_SITE_REQUIRE_SECAGG", "ture")
    with pytest.raises(ConfigError) as err:
        load_settings(SiteSettings)
    assert [p.where for p in err.value.problems] == ["FEDSYNTH_SITE_REQUIRE_SECAGG"]


def test_dotenv_is_read_and_unknown_prefixed_keys_warned(tmp_path, monkeypatch, caplog):
    (tmp_path / ".env").write_text("FEDSYNTH_SITE_SITE_ID=from-dotenv\n")
    assert load_settings(SiteSettings).site_id == "from-dotenv"
    (tmp_path / ".env").write_text("FEDSYNTH_SITE_EPSILON_CEILNG=100\n")  # a typo must not pass silently
    monkeypatch.setenv("FEDSYNTH_SITE_MIN_NOISE_MULTIPLEIR", "2")
    with caplog.at_level("WARNING", logger="fedsynth.settings"):
        settings = load_settings(SiteSettings)
    assert settings.epsilon_ceiling == 8.0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "FEDSYNTH_SITE_EPSILON_CEILNG" in warned and "FEDSYNTH_SITE_MIN_NOISE_MULTIPLEIR" in warned
    assert "FEDSYNTH_SITE_SITE_ID" not in warned


def test_the_deploy_example_works_as_dotenv(tmp_path, caplog):
    # README: copying deploy/site.env.example to .env is allowed; it holds launcher and
    # SuperNode keys too (16 "Extra inputs are not permitted" errors before)
    example = Path(__file__).resolve().parents[2] / "deploy" / "site.env.example"
    (tmp_path / ".env").write_text(example.read_text())
    with caplog.at_level("WARNING", logger="fedsynth.settings"):
        site = load_settings(SiteSettings)
        coord = load_settings(CoordinatorSettings)
    assert site.site_id == "site-a" and site.require_secagg is True and site.min_sites == 3
    assert coord.signing_key is None
    assert not caplog.records  # every FEDSYNTH_SITE_* key of the example is a real setting


def test_settings_are_frozen():
    s = load_settings(SiteSettings)
    with pytest.raises(ValidationError, match="frozen"):
        s.epsilon_ceiling = 100.0
    assert s.epsilon_ceiling == 8.0


def test_coordinator_settings_and_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSYNTH_COORD_RUN_DIR", str(tmp_path / "runs"))
    assert load_settings(CoordinatorSettings).run_dir == tmp_path / "runs"
    monkeypatch.setenv("FEDSYNTH_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
