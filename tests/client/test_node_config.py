"""A site's settings from its environment plus its SuperNode's node config (client/node_config.py).

The tightening rules themselves (ceiling, k_min, ledger path) are tested with the
site's policy in tests/client/test_policy.py.
"""

import pytest

from client.node_config import NODE_KEYS, site_settings
from shared.errors import ConfigError
from shared.settings import SiteSettings


@pytest.fixture(autouse=True)
def clean_env(clean_site_env, monkeypatch):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py); no sim root."""
    monkeypatch.delenv("FEDSYNTH_SIM_ROOT", raising=False)


def test_every_node_key_names_a_settings_field():
    assert set(NODE_KEYS.values()) <= set(SiteSettings.model_fields)


def test_data_dir_gives_notes_and_output_paths(tmp_path):
    s = site_settings({"data-dir": str(tmp_path), "k-min": 20, "site-id": "st-mary"})
    assert s.notes_path == tmp_path / "notes.jsonl" and s.output_dir == tmp_path / "output"
    assert s.k_min == 20 and s.site_id == "st-mary"
    explicit = site_settings({"data-dir": str(tmp_path), "output-dir": str(tmp_path / "elsewhere")})
    assert explicit.output_dir == tmp_path / "elsewhere"  # an explicit key wins over data-dir


def test_every_bad_key_is_listed_once():
    with pytest.raises(ConfigError, match="unknown key") as err:
        site_settings({"epsilon-override": 100.0, "coordinator-says": 1, "site-id": "a"})
    assert [p.where for p in err.value.problems] == ["node-config 'epsilon-override'",
                                                      "node-config 'coordinator-says'"]


def make_sim_root(tmp_path, monkeypatch):
    root = tmp_path / "sim"
    for name in ("site-c", "site-a", "empty", "site-b"):
        (root / name).mkdir(parents=True)
        if name != "empty":
            (root / name / "notes.jsonl").write_text("")
    monkeypatch.setenv("FEDSYNTH_SIM_ROOT", str(root))
    return root


def test_simulation_partition_i_is_the_ith_site_dir_with_notes(tmp_path, monkeypatch):
    root = make_sim_root(tmp_path, monkeypatch)
    sim = site_settings({"partition-id": 1, "num-partitions": 3})
    assert sim.site_id == "site-b" and sim.notes_path == root / "site-b" / "notes.jsonl"
    assert sim.output_dir == root / "site-b" / "output"
    assert site_settings({"partition-id": 2, "num-partitions": 3}).site_id == "site-c"
    with pytest.raises(ConfigError, match="found 3"):
        site_settings({"partition-id": 3, "num-partitions": 4})
    with pytest.raises(ConfigError, match="found 3"):
        site_settings({"partition-id": True, "num-partitions": 4})


def test_simulation_without_a_root_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        site_settings({"partition-id": 0, "num-partitions": 1})
    assert err.value.problems[0].where == "FEDSYNTH_SIM_ROOT"


def test_simulated_site_uses_the_signing_key_in_its_dir(tmp_path, monkeypatch):
    root = make_sim_root(tmp_path, monkeypatch)
    assert site_settings({"partition-id": 0, "num-partitions": 3}).signing_key is None
    (root / "site-a" / "signing.key").write_text("not read here")
    assert site_settings({"partition-id": 0, "num-partitions": 3}).signing_key == root / "site-a" / "signing.key"
