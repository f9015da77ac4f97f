"""The demo's run config: the defaults plus explicit overrides only, each one a real change."""

from server.cli import DEMO_OVERRIDES, DEMO_RUN
from shared.run_config import KNOWN_KEYS, RunConfig, to_flower


def test_demo_overrides_are_known_keys_that_each_change_a_default():
    defaults = to_flower(RunConfig())
    assert set(DEMO_OVERRIDES) <= KNOWN_KEYS
    assert [k for k, v in DEMO_OVERRIDES.items() if defaults[k] == v] == []  # no restated default
    demo = to_flower(DEMO_RUN)
    assert {k for k in KNOWN_KEYS if demo[k] != defaults[k]} == set(DEMO_OVERRIDES)
