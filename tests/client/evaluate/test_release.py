"""The release gate removes each kind of leak, counts it, and keeps clean reports."""

from __future__ import annotations

import numpy as np
import pytest

from client.evaluate.release import GateConfig, release_gate
from client.evaluate.tokens import word_tokens
from shared.errors import ConfigError


def _text(rng: np.random.Generator, prefix: str, n: int) -> str:
    return " ".join(rng.choice([f"{prefix}{i}" for i in range(300)], size=n))


def _case() -> tuple[list[str], list[str], list[str]]:
    rng = np.random.default_rng(0)
    private = [_text(rng, "p", 80) for _ in range(20)]
    clean = [_text(rng, "s", 80) for _ in range(4)]
    src = word_tokens(private[3])
    own = word_tokens(_text(rng, "s", 80))
    verbatim = " ".join(own[:40] + src[10:24] + own[40:])  # one 14-token copy, low ROUGE-L
    # near copy: every 4th private token replaced -> no 13-gram, high ROUGE-L
    near = " ".join(t if i % 4 else "zz" for i, t in enumerate(word_tokens(private[5])))
    echo = clean[0] + " patient Jane Doe-Smith seen"
    return private, clean + [verbatim, near, echo], ["Jane Doe-Smith", "Li"]


def test_gate_removes_each_kind_with_counts() -> None:
    private, synthetic, idents = _case()
    res = release_gate(synthetic, private, idents, config=GateConfig())
    assert res.kept == [0, 1, 2, 3]
    assert res.removed == {"verbatim_13": 1, "rouge_l": 1, "phi_echo": 1}


def test_gate_thresholds_change_outcome() -> None:
    private, synthetic, idents = _case()
    res = release_gate(synthetic, private, idents, config=GateConfig(max_ngram=15, max_rouge_l=1.0))
    assert res.kept == [0, 1, 2, 3, 4, 5]
    assert res.removed == {"verbatim_15": 0, "rouge_l": 0, "phi_echo": 1}


def test_gate_dcr() -> None:
    private, synthetic, idents = _case()
    rng = np.random.default_rng(1)
    private_emb = rng.normal(size=(len(private), 8))
    synthetic_emb = rng.normal(size=(len(synthetic), 8))
    synthetic_emb[1] = private_emb[7] * 2.0  # same direction: cosine distance 0
    res = release_gate(
        synthetic,
        private,
        idents,
        config=GateConfig(min_dcr=0.01),
        synthetic_emb=synthetic_emb,
        private_emb=private_emb,
    )
    assert res.removed["dcr"] == 1
    assert res.kept == [0, 2, 3]


def test_gate_config_errors_listed_together() -> None:
    with pytest.raises(ConfigError) as err:
        release_gate(["a"], ["b"], [], config=GateConfig(max_ngram=1, max_rouge_l=2.0, min_dcr=0.1))
    assert len(err.value.problems) == 3


def test_gate_cells() -> None:
    private, synthetic, idents = _case()
    cell = release_gate(synthetic, private, idents, config=GateConfig()).cells()[
        "release.kept_share"
    ]
    assert (cell.value, cell.n) == (4 / 7, 7)
