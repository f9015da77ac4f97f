"""fedsynth-site's privacy-budget commands (client/cli_ledger.py): ``budget``, ``ledger rotate-key``.

The recovery command is tested with its anchors (tests/client/dp/test_ledger_anchor.py).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from client.cli import app


@pytest.fixture(autouse=True)
def clean_env(clean_site_env):
    """FEDSYNTH_SITE_* cleared, cwd a temporary directory (tests/client/conftest.py)."""


def invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def test_budget_of_a_new_site_is_zero(tmp_path):
    result = invoke("budget", "--output-dir", str(tmp_path / "out"), "--json",
                    env={"FEDSYNTH_SITE_DELTA": "1e-5", "FEDSYNTH_SITE_EPSILON_CEILING": "4"})
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["epsilon_spent"] == 0 and got["epsilon_remaining"] == 4 and got["rounds"] == 0


def test_ledger_rotate_key_then_a_damaged_key_exits_7(tmp_path):
    out = tmp_path / "out"
    rotated = invoke("ledger", "rotate-key", "--output-dir", str(out))
    assert rotated.exit_code == 0 and "ledger key rotated" in rotated.output
    assert list(out.glob("ledger.key.retired-*"))
    (out / "ledger.key").write_text("not a key\n")
    damaged = invoke("ledger", "rotate-key", "--output-dir", str(out))
    assert damaged.exit_code == 7 and "error:" in damaged.output and "ledger key" in damaged.output
