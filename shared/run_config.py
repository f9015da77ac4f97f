"""Per-run knobs from ``[tool.flwr.app.config]``, parsed once into a frozen config.

The coordinator chooses these (Flower ships them to every site as
``context.run_config``), so at a site they are UNTRUSTED input: every key is
checked for type and range, unknown keys are refused, and one
:class:`~shared.errors.ConfigError` lists every problem. A site's own settings
(:class:`~shared.settings.SiteSettings`: epsilon ceiling, data paths, k_min
floor) always win over anything here; see :meth:`RunConfig.effective_k_min`.

Keys are kebab-case with dotted namespaces (``train.max-grad-norm``) and scalar
values only (bool, int, float, str), as Flower's run config requires. Lists are
comma-separated strings (``lora.targets = "q_proj,v_proj"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError, Problem
from shared.whitelist import ACCOUNTANTS

AGGREGATIONS = ("fedavg", "trimmed-mean", "median")
WEIGHTINGS = ("patients", "uniform")
CLIPPINGS = ("flat", "ghost", "bk")
LR_SCHEDULES = ("constant", "linear")
ADAPTER_DTYPES = ("float32", "float16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA shape: rank ``r``, scale ``alpha``/r, dropout, target module names.

    ``targets`` () means the model family's default: its attention and MLP
    projections (:data:`shared.adapter_spec.DEFAULT_LORA_TARGETS`).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    dtype: str = "float32"  # dtype of the tensors on the wire
    init_seed: int = 0  # every site initialises LoRA A from this seed so round-1 A's agree


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """DP-SGD knobs for one round at one site: what :func:`client.train.train_dp` takes.

    Privacy meaning: exactly one of ``noise_multiplier`` (sigma: noise std /
    ``max_grad_norm``, > 0) and ``epsilon_per_round`` (> 0: this round's epsilon
    alone at the site's delta; the site solves for sigma) is set, the other is 0.
    ``max_grad_norm`` is the per-patient clipping bound C. ``expected_batch_size``
    (patients per logical batch, in expectation) / n_patients is the Poisson
    sample rate q the accountant assumes; ``max_physical_batch_size`` only bounds
    memory. ``steps`` is the number of noisy optimizer steps charged per round.
    ``max_length`` is in tokens (prompt + report). ``clipping``: "flat" (Opacus
    per-sample gradients), "ghost" (Opacus ghost clipping) or "bk" (book-keeping,
    :mod:`client.dp.bookkeeping`); all clip the whole per-patient gradient and add
    the same noise. ``lr_schedule``: "constant" keeps ``learning_rate`` for every
    step of a round; "linear" decays it within each round, step ``k`` of ``steps``
    (from 0) at ``learning_rate * (1 - k / steps)`` -- post-processing of the noisy
    gradients, so ε is unchanged. There is deliberately no seed, and no switch that turns DP
    off: the study's non-private baseline is a separate argument of ``train_dp``.

    The defaults are the recipe the privacy-utility study measured (issue #15,
    docs/results.md); ``[tool.flwr.app.config]`` in pyproject.toml repeats them
    and a test keeps the two equal.
    """

    steps: int = 100
    expected_batch_size: int = 64
    max_physical_batch_size: int = 8
    learning_rate: float = 5e-3
    max_length: int = 448
    noise_multiplier: float = 1.0
    epsilon_per_round: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    secure_mode: bool = True  # ChaCha20 DP noise (client.dp.noise); False: urandom-seeded torch
    clipping: str = "flat"
    lr_schedule: str = "constant"


MAX_NEW_TOKENS = 32_768
"""The largest ``generate.max-new-tokens`` a run may ask for (tokens per report)."""


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Generation knobs; ``codes`` () means the codes present in the site's own notes.

    ``temperature`` 0 is greedy; ``top_p`` is nucleus mass in (0, 1]; ``top_k`` 0
    is off; ``repetition_penalty`` > 1 discourages repeats (1 = off);
    ``max_new_tokens`` bounds a report's length in tokens. A site's evaluation
    rounds bound these and draw their own seed (:mod:`client.evaluate.eval_policy`).
    """

    reports_per_code: int = 20
    codes: tuple[str, ...] = ()
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run's coordinator chooses. Timeouts are in seconds."""

    run_name: str = "fedsynth"
    num_rounds: int = 3
    min_sites: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    timeout_train: float = 3600.0
    timeout_evaluate: float = 3600.0
    timeout_wait_sites: float = 300.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    weighting: str = "patients"
    weight_cap: int = 0
    update_norm_bound: float = 0.0
    secagg: bool = False
    # SecAgg+ (docs/federation.md): every coordinate a site contributes is clipped to
    # +-secagg_clipping_range before quantisation; shares/threshold are fractions of the
    # sites sampled in a round (threshold is never below 2).
    secagg_clipping_range: float = 1.0
    secagg_num_shares: float = 1.0
    secagg_threshold: float = 0.7  # 0.6 gives 2 of 4 (= half): sites refuse that
    evaluate_k_min: int = 10
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()

    @classmethod
    def from_flower(cls, mapping: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's run config (``context.run_config``); ConfigError lists every bad key."""
        return _parse(mapping)

    def effective_k_min(self, site_floor: int) -> int:
        """Small-cell threshold actually used at a site: the run's value, never below the site's."""
        return max(self.evaluate_k_min, site_floor)


# ---- parsing ---------------------------------------------------------------

Check = Callable[[Any], str | None]


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None

    return check


def _one_of(options: tuple[str, ...] | frozenset[str]) -> Check:
    return lambda v: None if v in options else f"must be one of {sorted(options)}"


def _name(v: str) -> str | None:
    return None if _NAME_RE.match(v) else "must match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


def _targets(v: str) -> tuple[tuple[str, ...], str | None]:
    items = tuple(t.strip() for t in v.split(",") if t.strip())
    bad = [t for t in items if not _MODULE_RE.match(t)]
    return items, (f"not module names: {bad}" if bad else None)


def _codes(v: str) -> tuple[tuple[str, ...], str | None]:
    items = [t.strip() for t in v.split(",") if t.strip()]
    if not items:
        return (), None
    from shared import icd10  # the catalogue loads in ~70 ms: only when a run names codes

    bad = [t for t in items if not icd10.is_code(t)]
    if bad:
        return (), f"unknown ICD-10 codes: {bad}"
    canon = tuple(dict.fromkeys(icd10.normalize(t) for t in items))
    return canon, None


# key -> (section, field, type, check). Section "" is RunConfig itself.
_SPEC: dict[str, tuple[str, str, type, Check | None]] = {
    "run-name": ("", "run_name", str, _name),
    "num-rounds": ("", "num_rounds", int, _rng(1, 10_000)),
    "min-sites": ("", "min_sites", int, _rng(1, 10_000)),
    "fraction-train": ("", "fraction_train", float, _rng(0, 1, lo_open=True)),
    "fraction-evaluate": ("", "fraction_evaluate", float, _rng(0, 1, lo_open=True)),
    "timeout.train": ("", "timeout_train", float, _rng(1, 7 * 86400)),
    "timeout.evaluate": ("", "timeout_evaluate", float, _rng(1, 7 * 86400)),
    "timeout.wait-sites": ("", "timeout_wait_sites", float, _rng(0, 7 * 86400)),
    "aggregation": ("", "aggregation", str, _one_of(AGGREGATIONS)),
    "aggregation.trim-fraction": ("", "trim_fraction", float, _rng(0, 0.5, hi_open=True)),
    "aggregation.weighting": ("", "weighting", str, _one_of(WEIGHTINGS)),
    "aggregation.weight-cap": ("", "weight_cap", int, _rng(0)),
    "update-norm-bound": ("", "update_norm_bound", float, _rng(0)),
    "secagg": ("", "secagg", bool, None),
    "secagg-clipping-range": ("", "secagg_clipping_range", float, _rng(0, 1e6, lo_open=True)),
    "secagg-num-shares": ("", "secagg_num_shares", float, _rng(0, 1, lo_open=True)),
    "secagg-reconstruction-threshold": ("", "secagg_threshold", float, _rng(0, 1, lo_open=True)),
    "evaluate.k-min": ("", "evaluate_k_min", int, _rng(2, 1_000_000)),
    "lora.r": ("lora", "r", int, _rng(1, 1024)),
    "lora.alpha": ("lora", "alpha", float, _rng(0, 1e6, lo_open=True)),
    "lora.dropout": ("lora", "dropout", float, _rng(0, 1, hi_open=True)),
    "lora.targets": ("lora", "targets", str, None),
    "lora.dtype": ("lora", "dtype", str, _one_of(ADAPTER_DTYPES)),
    "lora.init-seed": ("lora", "init_seed", int, _rng(0, 2**32 - 1)),
    "train.steps": ("train", "steps", int, _rng(1, 1_000_000)),
    "train.expected-batch-size": ("train", "expected_batch_size", int, _rng(1, 1_000_000)),
    "train.max-physical-batch-size": ("train", "max_physical_batch_size", int, _rng(1, 65_536)),
    "train.learning-rate": ("train", "learning_rate", float, _rng(0, 1, lo_open=True)),
    "train.max-length": ("train", "max_length", int, _rng(8, 131_072)),
    "train.noise-multiplier": ("train", "noise_multiplier", float, _rng(0, 1000)),
    "train.epsilon-per-round": ("train", "epsilon_per_round", float, _rng(0, 1000)),
    "train.max-grad-norm": ("train", "max_grad_norm", float, _rng(0, 1e6, lo_open=True)),
    "train.accountant": ("train", "accountant", str, _one_of(ACCOUNTANTS)),
    "train.secure-mode": ("train", "secure_mode", bool, None),
    "train.clipping": ("train", "clipping", str, _one_of(CLIPPINGS)),
    "train.lr-schedule": ("train", "lr_schedule", str, _one_of(LR_SCHEDULES)),
    "generate.reports-per-code": ("generate", "reports_per_code", int, _rng(1, 100_000)),
    "generate.codes": ("generate", "codes", str, None),
    "generate.temperature": ("generate", "temperature", float, _rng(0, 10)),
    "generate.top-p": ("generate", "top_p", float, _rng(0, 1, lo_open=True)),
    "generate.top-k": ("generate", "top_k", int, _rng(0, 1_000_000)),
    "generate.repetition-penalty": ("generate", "repetition_penalty", float, _rng(0, 10, lo_open=True)),
    "generate.max-new-tokens": ("generate", "max_new_tokens", int, _rng(1, MAX_NEW_TOKENS)),
    "generate.seed": ("generate", "seed", int, _rng(0, 2**32 - 1)),
}

KNOWN_KEYS: frozenset[str] = frozenset(_SPEC)


def to_flower(run: RunConfig) -> dict[str, bool | int | float | str]:
    """``run`` as Flower run-config keys and scalars: the inverse of :meth:`RunConfig.from_flower`.

    Tuples (``lora.targets``, ``generate.codes``) become comma-separated strings.
    ``to_flower(RunConfig())`` is the default run config (pyproject.toml repeats it).
    """
    out: dict[str, bool | int | float | str] = {}
    for key, (section, field, _typ, _check) in _SPEC.items():
        value = getattr(getattr(run, section) if section else run, field)
        out[key] = ",".join(value) if isinstance(value, tuple) else value
    return out


def with_overrides(run: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``run`` with some Flower keys replaced, validated like any run config (ConfigError)."""
    return _parse({**to_flower(run), **overrides})


def _coerce(value: Any, typ: type) -> tuple[Any, str | None]:
    # bool is an int subclass: never let True pass as 1 (or 1 as True).
    if typ is bool:
        return value, None if isinstance(value, bool) else "must be a boolean"
    if isinstance(value, bool):
        return value, f"must be {typ.__name__}, got a boolean"
    if typ is int:
        return value, None if isinstance(value, int) else "must be an integer"
    if typ is float:
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value), None
        return value, "must be a finite number"
    if isinstance(value, str):
        if len(value) > 4096:
            return value, "string longer than 4096 characters"
        return value, None
    return value, "must be a string"


def _parse(mapping: Mapping[str, Any]) -> RunConfig:
    problems: list[Problem] = []
    if not isinstance(mapping, Mapping):
        raise ConfigError("run config must be a mapping", [Problem("run_config", type(mapping).__name__)])
    values: dict[str, dict[str, Any]] = {"": {}, "lora": {}, "train": {}, "generate": {}}
    for key in sorted(mapping, key=str):
        if key not in _SPEC:
            problems.append(Problem(str(key), "unknown run-config key"))
            continue
        section, field, typ, check = _SPEC[key]
        value, why = _coerce(mapping[key], typ)
        if why is None and key == "lora.targets":
            value, why = _targets(value)
        elif why is None and key == "generate.codes":
            value, why = _codes(value)
        elif why is None and check is not None:
            why = check(value)
        if why is not None:
            problems.append(Problem(key, f"{why} (got {mapping[key]!r:.80})"))
        else:
            values[section][field] = value

    train = values["train"]
    sigma = train.get("noise_multiplier", TrainConfig.noise_multiplier)
    eps_round = train.get("epsilon_per_round", TrainConfig.epsilon_per_round)
    if (sigma > 0) == (eps_round > 0):
        problems.append(
            Problem(
                "train.noise-multiplier",
                "set exactly one of train.noise-multiplier and train.epsilon-per-round "
                f"(> 0) and the other to 0 (got {sigma} and {eps_round}); 0 noise is not DP",
            )
        )
    top = values[""]
    if top.get("secagg", RunConfig.secagg) and top.get("aggregation", "fedavg") != "fedavg":
        problems.append(
            Problem(
                "aggregation",
                f"{top['aggregation']!r} needs each site's update in the clear; with secagg = true "
                "the coordinator only sees the sum, so only 'fedavg' is possible",
            )
        )
    if problems:
        raise ConfigError("invalid run config", problems)
    return RunConfig(
        **values[""],
        lora=LoraConfig(**values["lora"]),
        train=TrainConfig(**train),
        generate=GenerateConfig(**values["generate"]),
    )


def config_hash(run: RunConfig) -> str:
    """sha256 hex of the run config as canonical JSON (sorted keys, no whitespace).

    Sites and coordinator compute it from the same RunConfig, so an auditor can
    check that every party ran one configuration.
    """
    import dataclasses
    import hashlib

    from shared.signing import canonical_json

    return hashlib.sha256(canonical_json(dataclasses.asdict(run))).hexdigest()
