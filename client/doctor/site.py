"""``fedsynth-site doctor`` checks of this host and its data: GPU, model, notes, ledger, disk.

Each function returns one :class:`client.doctor.checks.Check`; :func:`client.doctor.run.run_doctor`
calls them in order. Nothing here trains or loads weights: the model check reads
file names and ``config.json``, the notes check runs the same validation a round
runs, and the ledger check opens the ledger the way a round would (creating an
empty one if none exists).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from client.doctor.checks import Check, fail_check, warn_check
from shared.errors import FedsynthError
from shared.settings import SiteSettings, cache_dir

_SHOW_PROBLEMS = 5  # notes problems shown in the detail; `fedsynth-site validate` lists all


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (absolute)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# --------------------------------------------------------------------------- GPU


def check_gpu(settings: SiteSettings) -> Check:
    """CUDA availability against ``settings.device``; CPU-only is a warning unless cuda was asked for."""
    import torch

    name = "GPU / CUDA"
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only wheel)'}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (float32 training)"
        detail = (f"{torch.cuda.device_count()} device(s); cuda:0 {props.name}, "
                  f"{props.total_memory / 2**30:.0f} GiB, {bf16}; {build}")
        if settings.device == "cpu":
            return warn_check(name, detail + "; but FEDSYNTH_SITE_DEVICE=cpu",
                              "set FEDSYNTH_SITE_DEVICE=auto (or cuda) to train on the GPU")
        return Check(name, True, detail)
    if torch.version.cuda is None:
        fix = ("install torch from the CUDA wheel index into the wheelhouse (see docs/hospital-it.md), "
               "then check `nvidia-smi`")
    else:
        fix = "check `nvidia-smi` (driver loaded, device visible to this account/container)"
    detail = f"no CUDA device visible; {build}"
    if settings.device == "cuda":
        return fail_check(name, detail + "; FEDSYNTH_SITE_DEVICE=cuda", fix + ", or set FEDSYNTH_SITE_DEVICE=cpu")
    return warn_check(name, detail + "; training runs on CPU (only the embedded demo model is practical)", fix)


# --------------------------------------------------------------------------- model


def _embedded_model_check() -> Check:
    from client import pretrain
    from client.embedded_artifact import verify_weights
    from shared.errors import ModelError

    name = "model"
    # The exact directory load_model(None) uses: ensure_embedded_model() with its defaults.
    built = pretrain.cached_model_dir()
    if (built / "BUILD.json").is_file():
        try:
            verify_weights(built)
        except ModelError as exc:
            return fail_check(name, str(exc), f"delete {built}; it is reinstalled on next use")
        return Check(name, True, f"embedded default model, installed at {built}")
    base = _existing_ancestor(cache_dir())
    shipped = pretrain.shipped_matches()
    if not os.access(base, os.W_OK):
        return fail_check(name, f"embedded default model not installed and {base} is not writable",
                          "set FEDSYNTH_CACHE_DIR to a writable directory, then run `fedsynth-site build-model`")
    if shipped:
        return Check(name, True, f"embedded default model shipped with fedsynth; copied to {built} on first use")
    return warn_check(name, f"embedded default model not built yet and the shipped one is another recipe "
                            f"(built on first use in {cache_dir()}, ~10 minutes)",
                      "run `fedsynth-site build-model` once now")


def _lfs_pointers(model_dir: Path) -> list[str]:
    # A clone without git-lfs leaves ~130-byte text pointers where the weights should be.
    found = []
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        if path.stat().st_size < 1024 and path.read_bytes()[:40].startswith(b"version https://git-lfs"):
            found.append(path.name)
    return found


def _missing_shards(model_dir: Path) -> list[str]:
    missing: set[str] = set()
    for index in model_dir.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            missing.add(f"{index.name} (unreadable)")
            continue
        missing.update(f for f in set(weight_map.values()) if not (model_dir / f).is_file())
    return sorted(missing)


def check_model(settings: SiteSettings) -> Check:
    """Model directory complete (config, tokenizer, weights, every shard) and of a supported family.

    No weights are loaded. ``model_dir`` unset means the embedded default: installed (weights hash checked), shipped or buildable.
    """
    from types import SimpleNamespace

    from client.model import FAMILIES, family_of, model_identity

    if settings.model_dir is None:
        return _embedded_model_check()
    name = "model"
    model_dir = Path(settings.model_dir)
    stage = ("stage the weights offline into this directory (config.json, tokenizer files, "
             "*.safetensors) or fix FEDSYNTH_SITE_MODEL_DIR; see docs/hospital-it.md")
    try:
        model_identity(model_dir)
    except FedsynthError as exc:
        return fail_check(name, "; ".join(p.reason for p in exc.problems) + f" ({model_dir})", stage)
    problems = []
    pointers = _lfs_pointers(model_dir)
    if pointers:
        problems.append(f"git-lfs pointer files instead of weights: {', '.join(pointers[:3])}")
    shards = _missing_shards(model_dir)
    if shards:
        problems.append(f"shards listed in the index but missing: {', '.join(shards[:3])}")
    try:
        model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(f"config.json unreadable: {exc}")
        model_type = None
    if problems:
        return fail_check(name, "; ".join(problems), stage)
    family = family_of(SimpleNamespace(model_type=model_type))
    if family is None:
        return warn_check(name, f"{model_dir}: model_type {model_type!r} has no default LoRA targets "
                                f"(supported families: {', '.join(FAMILIES)})",
                          "use a supported family, or agree explicit `lora.targets` in the run config")
    return Check(name, True, f"{model_dir}: {family} ({model_type}), config, tokenizer and weights present")


# --------------------------------------------------------------------------- notes


def check_notes(settings: SiteSettings) -> Check:
    """The notes file passes the same validation a round runs; δ ≤ 1/n_patients holds."""
    from client.notes import load_notes
    from client.patient_split import group_by_patient

    name = "notes"
    path = Path(settings.notes_path)
    try:
        loaded = load_notes(path, mode=settings.notes_mode)
    except FedsynthError as exc:
        shown = "; ".join(str(p) for p in exc.problems[:_SHOW_PROBLEMS])
        more = len(exc.problems) - _SHOW_PROBLEMS
        detail = exc.message + (f": {shown}" if shown else "") + (f" (+{more} more)" if more > 0 else "")
        return fail_check(name, detail,
                          f"fix the listed lines (`fedsynth-site validate {path}` lists every one), "
                          "or set FEDSYNTH_SITE_NOTES_MODE=skip to leave bad lines out (they are counted)")
    patients = len(group_by_patient(loaded.notes))
    detail = f"{path}: {len(loaded.notes)} notes, {patients} patients"
    if settings.delta is not None and settings.delta >= 1.0 / (10 * patients):
        return fail_check(name, detail + f"; FEDSYNTH_SITE_DELTA={settings.delta:g} >= 1/(10·{patients})",
                          "lower FEDSYNTH_SITE_DELTA far below 1/(10·patients) (e.g. 1e-5) or unset "
                          "it (default min(1e-5, 1/(10·b·ln b)), b = patients rounded down to 10s)")
    if loaded.skipped:
        return warn_check(name, detail + f"; {loaded.skipped} bad line(s) skipped",
                          f"`fedsynth-site validate {path} --mode skip` lists them")
    if os.name == "posix" and (mode := stat.S_IMODE(path.stat().st_mode)) & 0o007:
        return warn_check(name, detail + f"; readable by every account (mode {mode:04o})",
                          f"chmod o-rwx {path}")
    return Check(name, True, detail)


# --------------------------------------------------------------------------- ledger, disk


def _fs_type(path: Path) -> str | None:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(_existing_ancestor(path).resolve())
    best, kind = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def check_ledger(settings: SiteSettings) -> Check:
    """The privacy ledger's directory is writable and :class:`client.dp.ledger.Ledger` opens it.

    Privacy meaning: the ledger is the site's only memory of the epsilon it has
    spent; on a volatile file system (tmpfs) a reboot would reset it to zero.
    """
    from client.dp.ledger_anchor import open_site_ledger
    from client.dp.ledger_recovery import site_audit_log

    name = "privacy ledger"
    path = Path(settings.ledger_path or settings.output_dir / "privacy-ledger.jsonl")
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        return fail_check(name, f"{path}: {base} is a file, not a directory",
                          "point FEDSYNTH_SITE_LEDGER_PATH (or FEDSYNTH_SITE_OUTPUT_DIR) at a directory path")
    if not os.access(base, os.W_OK | os.X_OK):
        return fail_check(name, f"{path}: {base} is not writable by this account",
                          "chown the directory to the site's service account, or move the ledger")
    try:  # as a round opens it: MAC chain, then the audit-log and report anchors
        ledger = open_site_ledger(settings, site_audit_log(settings))
        entries = ledger.entries()
    except FedsynthError as exc:
        return fail_check(name, str(exc).splitlines()[0],
                          "restore the ledger and its key from the newest backup (never an older one), "
                          "or run `fedsynth-site ledger recover`; see docs/hospital-it.md")
    detail = f"{path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, ε ceiling {settings.epsilon_ceiling:g}"
    if _fs_type(path) in {"tmpfs", "ramfs"}:
        return fail_check(name, detail + "; on a memory file system (lost on reboot, epsilon would reset)",
                          "put FEDSYNTH_SITE_LEDGER_PATH on persistent, backed-up storage")
    return Check(name, True, detail)


def check_disk(settings: SiteSettings, *, min_free_gb: float = 5.0) -> Check:
    """Free space (GB = 10^9 bytes) where adapters, reports and caches are written."""
    name = "disk space"
    base = _existing_ancestor(Path(settings.output_dir))
    free_gb = shutil.disk_usage(base).free / 1e9
    detail = f"{free_gb:.1f} GB free at {base} (need {min_free_gb:g} GB)"
    if free_gb < min_free_gb:
        return fail_check(name, detail, "free space or set FEDSYNTH_SITE_OUTPUT_DIR to a larger volume")
    return Check(name, True, detail)
