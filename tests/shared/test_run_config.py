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


# ---- one definition per default: pyproject.toml repeats the code's defaults --------------


def _pyproject_run_config() -> dict:
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    return data["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_exactly_the_code_defaults():
    from shared.run_config import KNOWN_KEYS, to_flower

    cfg = _pyproject_run_config()
    assert set(cfg) == KNOWN_KEYS  # every knob listed, none unknown
    assert RunConfig.from_flower(cfg) == RunConfig()
    assert cfg == to_flower(RunConfig())
    # types too (a float written as an int would still compare equal above)
    assert {k: type(v) for k, v in cfg.items()} == {k: type(v) for k, v in to_flower(RunConfig()).items()}


def test_the_recipe_defaults():
    """The defaults the privacy-utility study chose (issue #15 item 4)."""
    run = RunConfig()
    t, lora = run.train, run.lora
    assert (t.steps, t.expected_batch_size, t.max_physical_batch_size) == (100, 64, 8)
    assert (t.learning_rate, t.max_length) == (5e-3, 448)
    assert (lora.r, lora.alpha, lora.targets) == (16, 32.0, ())  # () = attention + MLP of the family
    assert (run.num_rounds, run.generate.max_new_tokens) == (3, 256)


def test_with_overrides_validates_and_round_trips():
    from shared.errors import ConfigError
    from shared.run_config import to_flower, with_overrides

    run = with_overrides(RunConfig(), {"train.steps": 7, "lora.targets": "q_proj,v_proj"})
    assert run.train.steps == 7 and run.lora.targets == ("q_proj", "v_proj")
    assert RunConfig.from_flower(to_flower(run)) == run
    with pytest.raises(ConfigError):
        with_overrides(RunConfig(), {"train.steps": 0})
