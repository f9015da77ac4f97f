"""Per-deployment settings (paths, device, keys, the epsilon ceiling).

Read with pydantic-settings from the environment (prefix ``FEDSYNTH_SITE_`` /
``FEDSYNTH_COORD_``), a ``.env`` file and a secrets directory. These are the
site's own decisions: they are never sent over the wire and a coordinator
cannot change them (the ClientApp reads them from the site's environment and
node config, never from the run config).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError, Problem


def cache_dir() -> Path:
    """Where built artefacts (the embedded model, embedding caches) live: ``$FEDSYNTH_CACHE_DIR``."""
    return Path(os.environ.get("FEDSYNTH_CACHE_DIR", Path.home() / ".cache" / "fedsynth"))


class SiteSettings(BaseSettings):
    """A hospital site's deployment settings.

    Privacy meaning: ``epsilon_ceiling`` is the largest total epsilon (patient-level
    (epsilon, delta)-DP, composed over every round this site ever trained, as
    recomputed from the ledger) the site accepts; ``delta`` must be at most
    1/n_patients and defaults to 1/(10 * n_patients) when unset.
    ``require_secagg`` True: this site sends updates only inside Flower's SecAgg+
    protocol (the coordinator sees only the sum over sites); a plain train round
    is declined before anything is trained or spent, whatever the run config says.
    Default False so the CPU demo's plain rounds run; deployments set it True.
    """

    model_config = SettingsConfigDict(
        env_prefix="FEDSYNTH_SITE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
        secrets_dir=os.environ.get("FEDSYNTH_SECRETS_DIR") or None,
    )

    site_id: str = Field("site", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    notes_path: Path = Path("notes.jsonl")
    notes_mode: Literal["strict", "skip"] = "strict"
    model_dir: Path | None = None  # None: the embedded default model
    output_dir: Path = Path("site-output")
    ledger_path: Path | None = None  # None: <output_dir>/privacy-ledger.jsonl
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
    # The site's policy, not the coordinator's: the run config cannot lower it.
    require_secagg: bool = False

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

    model_config = SettingsConfigDict(
        env_prefix="FEDSYNTH_COORD_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
        secrets_dir=os.environ.get("FEDSYNTH_SECRETS_DIR") or None,
    )

    run_dir: Path = Path("coordinator-output")
    signing_key: Path | None = None


def load_settings(cls: type[BaseSettings], **overrides: Any) -> Any:
    """Build ``cls`` from env/.env/secrets plus ``overrides``; every problem listed at once."""
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
