"""Per-deployment settings (paths, device, keys, the epsilon ceiling).

Read with pydantic-settings from the environment (prefix ``FEDSYNTH_SITE_`` /
``FEDSYNTH_COORD_``), a ``.env`` file and a secrets directory. These are the
site's own decisions: they are never sent over the wire and a coordinator
cannot change them (the ClientApp reads them from the site's environment and
node config, never from the run config).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.dp_defaults import DEFAULT_EVAL_NOISE_MULTIPLIER
from shared.errors import ConfigError, Problem

log = logging.getLogger("fedsynth.settings")


def cache_dir() -> Path:
    """Where built artefacts (the embedded model, embedding caches) live: ``$FEDSYNTH_CACHE_DIR``."""
    return Path(os.environ.get("FEDSYNTH_CACHE_DIR", Path.home() / ".cache" / "fedsynth"))


def _sources(env_prefix: str) -> SettingsConfigDict:
    """Where a program's settings come from: ``<env_prefix>*`` variables, ``.env``, the secrets dir."""
    return SettingsConfigDict(
        env_prefix=env_prefix,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",  # a shared .env holds other programs' keys; see unknown_settings
        frozen=True,
        secrets_dir=os.environ.get("FEDSYNTH_SECRETS_DIR") or None,
    )


class SiteSettings(BaseSettings):
    """A hospital site's deployment settings.

    Privacy meaning: ``epsilon_ceiling`` is the largest total epsilon (patient-level
    (epsilon, delta)-DP, composed over every round this site ever trained, as
    recomputed from the ledger) the site accepts; ``delta`` must be below
    1/(10 * n_patients) and defaults to min(1e-5, 1/(10 * b * ln b)) with b the
    patients bucket (n rounded down to a multiple of 10), so δ reveals only b
    (:func:`client.site.site_delta`).
    ``require_secagg`` True: this site sends updates only inside Flower's SecAgg+
    protocol (the coordinator sees only the sum over sites); a plain train round
    is declined before anything is trained or spent, whatever the run config says.
    Default False so the CPU demo's plain rounds run; deployments set it True.
    """

    model_config = _sources("FEDSYNTH_SITE_")

    site_id: str = Field("site", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    notes_path: Path = Path("notes.jsonl")
    notes_mode: Literal["strict", "skip"] = "strict"
    model_dir: Path | None = None  # None: the embedded default model
    output_dir: Path = Path("site-output")
    ledger_path: Path | None = None  # None: <output_dir>/privacy-ledger.jsonl
    ledger_key: Path | None = None  # the ledger's HMAC secret; None: <output_dir>/ledger.key
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Decode slots of site generation (reports generated at once); None: 64 on CUDA (bf16
    # 1B-8B models fit with their KV ring on one 80 GB GPU), 16 on CPU.
    generation_batch_size: int | None = Field(None, ge=1, le=1024)
    epsilon_ceiling: float = Field(8.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    signing_key: Path | None = None
    k_min: int = Field(10, ge=2)
    # Evaluation is a DP mechanism charged to the ledger (docs/metrics.md): its noise multiplier,
    # how many evaluations one run may ask for, and the lowest temperature it samples at.
    eval_noise_multiplier: float = Field(DEFAULT_EVAL_NOISE_MULTIPLIER, ge=0.5)
    max_evaluations_per_run: int = Field(10, ge=1)
    min_eval_temperature: float = Field(0.7, ge=0.1, le=2.0)
    # The site's policy, not the coordinator's: the run config cannot lower it.
    require_secagg: bool = False
    # Site floors (client/policy.py, docs/privacy-model.md "Site floors"): the run config
    # and the node config may only TIGHTEN these; a looser value is raised/lowered to
    # the floor (logged, audit kind ``policy_tightened``) or, where only the coordinator
    # can act on it (min-sites, SecAgg+ threshold/group), the round is refused.
    require_secure_noise: bool = True  # DP noise and sampling from the OS CSPRNG, whatever the run says
    min_noise_multiplier: float = Field(0.5, gt=0, le=1000)  # sigma floor (noise std / clipping bound)
    max_epsilon_per_round: float = Field(2.0, gt=0)  # cap on one round's epsilon at the site's delta
    # top-k = 1 or a tiny top-p is greedy decoding whatever the temperature: floors for both
    min_eval_top_p: float = Field(0.9, gt=0, le=1)
    min_eval_top_k: int = Field(50, ge=1)  # a run's top-k in [1, this) is raised to it; 0 (off) stays
    min_secagg_threshold: float = Field(0.6, gt=0.5, le=1)  # SecAgg+ threshold / shares, > 1/2
    min_secagg_group_size: int = Field(3, ge=2)  # fewest SecAgg+ share holders (demo/tests: 2)
    min_sites: int = Field(2, ge=1)  # the run's min-sites may not be lower

    @model_validator(mode="after")
    def _default_ledger(self) -> SiteSettings:
        if self.ledger_path is None:
            object.__setattr__(self, "ledger_path", self.output_dir / "privacy-ledger.jsonl")
        return self

    def resolved_device(self) -> str:
        """``cuda`` when asked (or ``auto`` and a GPU is present), else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


class CoordinatorSettings(BaseSettings):
    """The coordinator's deployment settings (checkpoints, reports, its signing key)."""

    model_config = _sources("FEDSYNTH_COORD_")

    run_dir: Path = Path("coordinator-output")
    signing_key: Path | None = None
    # The base model's config.json (or its directory; no weights needed): the coordinator
    # derives the run's adapter spec from it (shared/adapter_spec.py). None: the embedded model.
    base_model_config: Path | None = None


def unknown_settings(cls: type[BaseSettings], environ: Mapping[str, str] | None = None,
                     env_file: Path | None = None) -> list[str]:
    """Variables with ``cls``'s prefix (environment or ``.env``) that name no setting: typos.

    A ``.env`` file may hold other keys (deploy/site.env.example wires the launcher
    and the SuperNode too); only a key with this prefix that matches no field is
    reported, since a misspelled ``FEDSYNTH_SITE_EPSILON_CIELING`` would otherwise
    leave the default in force without a word.
    """
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    known = {prefix + name.upper() for name in cls.model_fields}
    keys = set(os.environ if environ is None else environ)
    path = Path(env_file if env_file is not None else str(cls.model_config.get("env_file") or ""))
    if path.name and path.is_file():
        keys |= {k for k in dotenv_values(path) if k}
    return sorted(k for k in keys if k.upper().startswith(prefix) and k.upper() not in known)


def load_settings(cls: type[BaseSettings], **overrides: Any) -> Any:
    """Build ``cls`` from env/.env/secrets plus ``overrides``; every problem listed at once.

    Unknown ``<prefix>*`` variables are logged as warnings (:func:`unknown_settings`).
    """
    for name in unknown_settings(cls):
        log.warning("%s is not a %s setting and is ignored (misspelled? see docs/hospital-it.md)",
                    name, cls.__name__)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = [
            Problem(
                f"{prefix}{'.'.join(str(p) for p in err['loc']).upper()}" if err["loc"] else cls.__name__,
                err["msg"],
            )
            for err in exc.errors()
        ]
        raise ConfigError(f"invalid {cls.__name__}", problems) from None
