"""RunConfig: every bad or unknown key is listed; values are typed; site floors win."""

import pytest

from shared.errors import ConfigError
from shared.run_config import KNOWN_KEYS, RunConfig


def test_defaults_and_types():
    run = RunConfig.from_flower({"num-rounds": 5, "lora.alpha": 16, "lora.targets": "q_proj, v_proj",
                                 "generate.codes": "f321,F41.1,F32.1"})
    assert run.num_rounds == 5
    assert run.lora.alpha == 16.0 and isinstance(run.lora.alpha, float)
    assert run.lora.targets == ("q_proj", "v_proj")
    assert run.generate.codes == ("F32.1", "F41.1")  # canonical, deduplicated
    assert run.train.accountant == "prv" and run.aggregation == "fedavg"


def test_frozen():
    run = RunConfig.from_flower({})
    with pytest.raises(AttributeError):
        run.num_rounds = 9  # type: ignore[misc]


def test_every_problem_listed():
    bad = {
        "num-rounds": 0,
        "min-sites": 1.5,
        "aggregation": "mean",
        "lora.r": True,
        "lora.targets": "q_proj,rm -rf",
        "train.accountant": "gdp",
        "train.secure-mode": 1,
        "generate.codes": "F32,NOTACODE",
        "generate.top-p": 0.0,
        "note-text": "John Doe",
    }
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower(bad)
    where = {p.where for p in err.value.problems}
    assert where == set(bad)
    assert "unknown run-config key" in str(err.value)


def test_noise_xor_epsilon():
    with pytest.raises(ConfigError, match="exactly one"):
        RunConfig.from_flower({"train.noise-multiplier": 0.0})
    with pytest.raises(ConfigError, match="exactly one"):
        RunConfig.from_flower({"train.epsilon-per-round": 1.0})
    run = RunConfig.from_flower({"train.noise-multiplier": 0, "train.epsilon-per-round": 2})
    assert run.train.epsilon_per_round == 2.0


def test_site_k_min_floor_wins():
    run = RunConfig.from_flower({"evaluate.k-min": 2})
    assert run.effective_k_min(10) == 10
    assert RunConfig.from_flower({"evaluate.k-min": 50}).effective_k_min(10) == 50


def test_pyproject_config_parses():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    cfg = data["tool"]["flwr"]["app"]["config"]
    flat = {}

    def walk(prefix, table):
        for k, v in table.items():
            key = f"{prefix}.{k}" if prefix else k
            walk(key, v) if isinstance(v, dict) else flat.__setitem__(key, v)

    walk("", cfg)
    assert set(flat) <= KNOWN_KEYS
    RunConfig.from_flower(flat)
