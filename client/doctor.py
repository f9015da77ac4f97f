"""``fedsynth-site doctor``: check a site's prerequisites before its first round.

Each check returns a :class:`Check` saying what was found and, when something
is wrong, the one thing to do about it. Nothing here trains, loads weights or
sends data: the model check reads file names and ``config.json``, the notes
check runs the same validation a round runs, the coordinator check is a TLS
handshake only (no Flower message, no site data), and the ledger check opens
the ledger the way a round would (creating an empty one if none exists).

A check is ``ok`` or failed; an ``ok`` check may carry ``warning=True`` when
the site can run but an operator should look (a CPU-only host, unsigned
reports, notes readable by other accounts, plain train rounds allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.errors import FedsynthError
from shared.settings import SiteSettings, cache_dir

_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_SHOW_PROBLEMS = 5  # notes problems shown in the detail; `fedsynth-site validate` lists all
_CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    """One prerequisite: ``ok`` False means a round would fail; ``fix`` says what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def _warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, True, detail, fix, warning=True)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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
            return _warn(name, detail + "; but FEDSYNTH_SITE_DEVICE=cpu",
                         "set FEDSYNTH_SITE_DEVICE=auto (or cuda) to train on the GPU")
        return Check(name, True, detail)
    if torch.version.cuda is None:
        fix = ("install torch from the CUDA wheel index into the wheelhouse (see docs/hospital-it.md), "
               "then check `nvidia-smi`")
    else:
        fix = "check `nvidia-smi` (driver loaded, device visible to this account/container)"
    detail = f"no CUDA device visible; {build}"
    if settings.device == "cuda":
        return _fail(name, detail + "; FEDSYNTH_SITE_DEVICE=cuda", fix + ", or set FEDSYNTH_SITE_DEVICE=cpu")
    return _warn(name, detail + "; training runs on CPU (only the embedded demo model is practical)", fix)


# --------------------------------------------------------------------------- model


def _embedded_model_check() -> Check:
    from client import pretrain

    name = "model"
    # The exact directory load_model(None) uses: ensure_embedded_model() with its defaults.
    built = cache_dir() / f"embedded-{pretrain._recipe_hash(0, 300.0)}"
    if (built / "BUILD.json").is_file():
        return Check(name, True, f"embedded default model, built at {built}")
    base = _existing_ancestor(cache_dir())
    if not os.access(base, os.W_OK):
        return _fail(name, f"embedded default model not built and {base} is not writable",
                     "set FEDSYNTH_CACHE_DIR to a writable directory, then run `fedsynth-site build-model`")
    return _warn(name, f"embedded default model not built yet (built on first use in {cache_dir()}, "
                       "up to 5 minutes)", "run `fedsynth-site build-model` once now")


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

    No weights are loaded. ``model_dir`` unset means the embedded default: cached or buildable.
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
        return _fail(name, "; ".join(p.reason for p in exc.problems) + f" ({model_dir})", stage)
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
        return _fail(name, "; ".join(problems), stage)
    family = family_of(SimpleNamespace(model_type=model_type))
    if family is None:
        return _warn(name, f"{model_dir}: model_type {model_type!r} has no default LoRA targets "
                           f"(supported families: {', '.join(FAMILIES)})",
                     "use a supported family, or agree explicit `lora.targets` in the run config")
    return Check(name, True, f"{model_dir}: {family} ({model_type}), config, tokenizer and weights present")


# --------------------------------------------------------------------------- notes


def check_notes(settings: SiteSettings) -> Check:
    """The notes file passes the same validation a round runs; δ ≤ 1/n_patients holds."""
    from client.notes import group_by_patient, load_notes

    name = "notes"
    path = Path(settings.notes_path)
    try:
        loaded = load_notes(path, mode=settings.notes_mode)
    except FedsynthError as exc:
        shown = "; ".join(str(p) for p in exc.problems[:_SHOW_PROBLEMS])
        more = len(exc.problems) - _SHOW_PROBLEMS
        detail = exc.message + (f": {shown}" if shown else "") + (f" (+{more} more)" if more > 0 else "")
        return _fail(name, detail,
                     f"fix the listed lines (`fedsynth-site validate {path}` lists every one), "
                     "or set FEDSYNTH_SITE_NOTES_MODE=skip to leave bad lines out (they are counted)")
    patients = len(group_by_patient(loaded.notes))
    detail = f"{path}: {len(loaded.notes)} notes, {patients} patients"
    if settings.delta is not None and settings.delta > 1.0 / patients:
        return _fail(name, detail + f"; FEDSYNTH_SITE_DELTA={settings.delta:g} > 1/{patients}",
                     "lower FEDSYNTH_SITE_DELTA (unset: 1/(10·patients)) or add patients")
    if loaded.skipped:
        return _warn(name, detail + f"; {loaded.skipped} bad line(s) skipped",
                     f"`fedsynth-site validate {path} --mode skip` lists them")
    if os.name == "posix" and _mode(path) & 0o007:
        return _warn(name, detail + f"; readable by every account (mode {_mode(path):04o})",
                     f"chmod o-rwx {path}")
    return Check(name, True, detail)


# --------------------------------------------------------------------------- certificates, keys


def check_root_cert(root_cert: Path | None, *, now: datetime | None = None) -> Check:
    """The consortium CA: readable PEM, a CA certificate, valid now (warns 30 days before expiry)."""
    from cryptography import x509

    name = "root CA"
    ask = "get the consortium's current ca.crt from the coordinator (made by `python -m server.pki`)"
    if root_cert is None:
        return _warn(name, "not given (needed to reach the coordinator)",
                     "pass --root-cert or set FEDSYNTH_CA_CERT")
    try:
        certs = x509.load_pem_x509_certificates(Path(root_cert).read_bytes())
    except OSError as exc:
        return _fail(name, f"{root_cert}: {exc.strerror or exc}", ask)
    except ValueError:
        return _fail(name, f"{root_cert}: not a PEM certificate", ask)
    now = now or datetime.now(UTC)
    cert = certs[0]
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    subject = cert.subject.rfc4514_string()
    if not is_ca:
        return _fail(name, f"{root_cert}: {subject} is not a CA certificate (server.pem given?)", ask)
    if now < cert.not_valid_before_utc:
        return _fail(name, f"{root_cert}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                     "check this host's clock (timedatectl; NTP)")
    if now > cert.not_valid_after_utc:
        return _fail(name, f"{root_cert}: expired {cert.not_valid_after_utc:%Y-%m-%d}", ask)
    detail = f"{subject}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_after_utc - now < timedelta(days=_CERT_WARN_DAYS):
        return _warn(name, detail + " (expires soon)", "ask the coordinator for the renewed CA in time")
    return Check(name, True, detail)


def check_auth_key(auth_key: Path | None) -> Check:
    """SuperNode authentication key: OpenSSH ECDSA on a NIST curve, unencrypted, mode 0600."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    name = "SuperNode key"
    make = ("make a new pair with `ssh-keygen -t ecdsa -b 384 -N '' -f KEY` and send only KEY.pub "
            "to the coordinator to register")
    if auth_key is None:
        return _warn(name, "not given (needed to join the federation)",
                     "pass --auth-key or set FEDSYNTH_DEPLOY_KEY")
    path = Path(auth_key)
    try:
        data = path.read_bytes()
        mode = _mode(path)
    except OSError as exc:
        return _fail(name, f"{path}: {exc.strerror or exc}", make)
    if os.name == "posix" and mode & 0o077:
        return _fail(name, f"{path}: mode {mode:04o} lets other accounts read the site's identity",
                     f"chmod 600 {path} (owned by the site's service account)")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        return _fail(name, f"{path}: encrypted with a passphrase (the SuperNode cannot prompt)",
                     f"remove the passphrase: ssh-keygen -p -N '' -f {path}")
    except Exception as exc:  # any parse failure is the same finding
        return _fail(name, f"{path}: not an OpenSSH private key ({type(exc).__name__})", make)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _NIST_CURVES:
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        return _fail(name, f"{path}: {kind} key; Flower needs ECDSA on a NIST curve", make)
    detail = f"{path}: ECDSA {key.curve.name}, mode {mode:04o}"
    pub = path.with_name(path.name + ".pub")
    if pub.is_file():
        derived = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH)
        if pub.read_bytes().split()[:2] != derived.split()[:2]:
            return _fail(name, f"{pub} does not match {path}",
                         f"regenerate {pub} with `ssh-keygen -y -f {path}` and re-register it")
    return Check(name, True, detail)


def check_signing_key(settings: SiteSettings) -> Check:
    """The Ed25519 key that signs this site's privacy reports (shared.signing.load_private_key)."""
    from shared.signing import load_private_key

    name = "signing key"
    if settings.signing_key is None:
        return _warn(name, "FEDSYNTH_SITE_SIGNING_KEY unset: privacy reports are not signed",
                     "ssh-keygen -t ed25519 -N '' -f /srv/site/keys/signing; "
                     "set FEDSYNTH_SITE_SIGNING_KEY to it; give auditors the .pub")
    try:
        load_private_key(Path(settings.signing_key))
    except FedsynthError as exc:
        reason = "; ".join(p.reason for p in exc.problems) or exc.message
        fix = (f"chmod 600 {settings.signing_key}" if "permissions" in exc.message
               else "point FEDSYNTH_SITE_SIGNING_KEY at an unencrypted Ed25519 key "
                    "(ssh-keygen -t ed25519 -N '' -f KEY)")
        return _fail(name, f"{settings.signing_key}: {exc.message}: {reason}", fix)
    return Check(name, True, f"{settings.signing_key}: Ed25519")


def check_secagg(settings: SiteSettings) -> Check:
    """The site's ``require_secagg`` policy: whether it ever sends an unmasked adapter update.

    Privacy meaning: with False, a coordinator whose run config says ``secagg = false``
    receives this site's adapter in the clear (DP-protected, but not hidden in a sum).
    False is meant for the CPU demo only, hence a warning, not a failure.
    """
    name = "secure aggregation"
    if settings.require_secagg:
        return Check(name, True, "FEDSYNTH_SITE_REQUIRE_SECAGG=true: only SecAgg+ (masked) updates "
                                 "leave; plain train rounds are declined (secagg_required)")
    return _warn(name, "FEDSYNTH_SITE_REQUIRE_SECAGG=false: a run with secagg = false gets this "
                       "site's adapter update in the clear",
                 "set FEDSYNTH_SITE_REQUIRE_SECAGG=true (false is for the CPU demo only)")


# --------------------------------------------------------------------------- coordinator


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_coordinator(coordinator: str | None, root_cert: Path | None, *, timeout: float = 5.0) -> Check:
    """TCP connect + TLS handshake to the coordinator's Fleet API, verifying against the CA.

    The handshake checks what the SuperNode will check: the chain to ``root_cert``
    and the dialled host name in the certificate's SANs. No Flower message is sent.
    """
    name = "coordinator"
    if coordinator is None:
        return _warn(name, "not given", "pass --coordinator HOST:PORT or set FEDSYNTH_SUPERLINK")
    parsed = _split_address(coordinator)
    if parsed is None:
        return _fail(name, f"{coordinator!r} is not HOST:PORT", "e.g. coordinator.example.org:9092")
    if root_cert is None:
        return _fail(name, "no root CA to verify the coordinator with",
                     "pass --root-cert or set FEDSYNTH_CA_CERT")
    host, port = parsed
    try:
        context = ssl.create_default_context(cafile=str(root_cert))
    except (OSError, ssl.SSLError) as exc:
        return _fail(name, f"cannot use {root_cert} as CA: {exc}", "fix the root CA (see its check)")
    context.set_alpn_protocols(["h2"])  # what gRPC offers
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
    except socket.gaierror as exc:
        return _fail(name, f"cannot resolve {host}: {exc.strerror}",
                     "check DNS / /etc/hosts for the coordinator's name")
    except ssl.SSLCertVerificationError as exc:
        return _fail(name, f"{coordinator}: certificate not trusted: {exc.verify_message}",
                     "use the consortium's current ca.crt and dial a host name listed in the "
                     "SuperLink certificate (python -m server.pki ... --host NAME)")
    except ssl.SSLError as exc:
        return _fail(name, f"{coordinator}: TLS handshake failed: {exc.reason or exc}",
                     "check that HOST:PORT is the Fleet API (not the Control API) and no proxy "
                     "intercepts TLS")
    except ConnectionRefusedError:
        return _fail(name, f"{coordinator}: connection refused",
                     "ask the coordinator whether the SuperLink is up; check the Fleet API port")
    except TimeoutError:
        return _fail(name, f"{coordinator}: no answer within {timeout:g} s",
                     "open outbound TCP to the coordinator's Fleet API port in the hospital firewall")
    except OSError as exc:
        return _fail(name, f"{coordinator}: {exc.strerror or exc}",
                     "check routing and firewall to the coordinator")
    return Check(name, True, f"{coordinator}: TLS ({version}) verified against {root_cert}")


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
    """The privacy ledger's directory is writable and :class:`client.ledger.Ledger` opens it.

    Privacy meaning: the ledger is the site's only memory of the epsilon it has
    spent; on a volatile file system (tmpfs) a reboot would reset it to zero.
    """
    from client.ledger import Ledger

    name = "privacy ledger"
    path = Path(settings.ledger_path or settings.output_dir / "privacy-ledger.jsonl")
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        return _fail(name, f"{path}: {base} is a file, not a directory",
                     "point FEDSYNTH_SITE_LEDGER_PATH (or FEDSYNTH_SITE_OUTPUT_DIR) at a directory path")
    if not os.access(base, os.W_OK | os.X_OK):
        return _fail(name, f"{path}: {base} is not writable by this account",
                     "chown the directory to the site's service account, or move the ledger")
    try:
        ledger = Ledger(path, site_id=settings.site_id)
        entries = ledger.entries()
    except FedsynthError as exc:
        return _fail(name, str(exc).splitlines()[0],
                     "restore the ledger from the newest backup (never an older one) or see "
                     "docs/hospital-it.md, troubleshooting")
    detail = f"{path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, ε ceiling {settings.epsilon_ceiling:g}"
    if _fs_type(path) in {"tmpfs", "ramfs"}:
        return _fail(name, detail + "; on a memory file system (lost on reboot, epsilon would reset)",
                     "put FEDSYNTH_SITE_LEDGER_PATH on persistent, backed-up storage")
    return Check(name, True, detail)


def check_disk(settings: SiteSettings, *, min_free_gb: float = 5.0) -> Check:
    """Free space (GB = 10^9 bytes) where adapters, reports and caches are written."""
    name = "disk space"
    base = _existing_ancestor(Path(settings.output_dir))
    free_gb = shutil.disk_usage(base).free / 1e9
    detail = f"{free_gb:.1f} GB free at {base} (need {min_free_gb:g} GB)"
    if free_gb < min_free_gb:
        return _fail(name, detail, "free space or set FEDSYNTH_SITE_OUTPUT_DIR to a larger volume")
    return Check(name, True, detail)


# --------------------------------------------------------------------------- all together


def _opt(flag: str, envvar: str | None, help_text: str) -> Any:
    return typer.Option(flag, envvar=envvar, help=help_text)


def run_doctor(
    settings: SiteSettings,
    *,
    coordinator: str | None,
    root_cert: Path | None,
    auth_key: Path | None,
    min_free_gb: float = 5.0,
    timeout: float = 5.0,
) -> list[Check]:
    """Every check, in the order an operator fixes them. ``timeout`` (s) bounds the TLS check."""
    return [
        check_gpu(settings),
        check_model(settings),
        check_notes(settings),
        check_root_cert(root_cert),
        check_auth_key(auth_key),
        check_signing_key(settings),
        check_secagg(settings),
        check_coordinator(coordinator, root_cert, timeout=timeout),
        check_ledger(settings),
        check_disk(settings, min_free_gb=min_free_gb),
    ]


def doctor_command(
    coordinator: Annotated[str | None, _opt("--coordinator", "FEDSYNTH_SUPERLINK",
                                            "Fleet API HOST:PORT of the coordinator.")] = None,
    root_cert: Annotated[Path | None, _opt("--root-cert", "FEDSYNTH_CA_CERT",
                                           "The consortium ca.crt.")] = None,
    auth_key: Annotated[Path | None, _opt("--auth-key", "FEDSYNTH_DEPLOY_KEY",
                                          "This site's SuperNode private key.")] = None,
    data_dir: Annotated[Path | None, _opt("--data-dir", "FEDSYNTH_DATA_DIR",
                                          "The SuperNode's data-dir (notes.jsonl, output/).")] = None,
    site_id: Annotated[str | None, _opt("--site-id", "FEDSYNTH_DEPLOY_SITE_ID",
                                        "The SuperNode's site-id.")] = None,
    min_free_gb: Annotated[float, _opt("--min-free-gb", None, "Free disk needed (GB).")] = 5.0,
    timeout: Annotated[float, _opt("--timeout", None, "Seconds for the TLS check.")] = 5.0,
) -> None:
    """Check this site's prerequisites (GPU, model, notes, keys, SecAgg policy, coordinator, ledger, disk).

    Settings are those the ClientApp will see: ``FEDSYNTH_SITE_*`` plus the
    node config deploy/site.sh passes (``data-dir``, ``site-id``). Exits 1 when
    any check failed.
    """
    from rich.console import Console
    from rich.table import Table

    from client.app import site_settings

    node_config = {k: str(v) for k, v in (("data-dir", data_dir), ("site-id", site_id)) if v}
    console = Console()
    try:
        settings = site_settings(node_config)
    except FedsynthError as exc:
        checks = [_fail("settings", str(exc), "fix the listed FEDSYNTH_SITE_* values")]
    else:
        checks = [Check("settings", True, f"site {settings.site_id}, device {settings.device}")]
        checks += run_doctor(settings, coordinator=coordinator, root_cert=root_cert,
                             auth_key=auth_key, min_free_gb=min_free_gb, timeout=timeout)
    table = Table(title="fedsynth site doctor", show_lines=True)
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        status = "[red]FAIL[/]" if not c.ok else "[yellow]WARN[/]" if c.warning else "[green]OK[/]"
        table.add_row(c.name, status, c.detail, c.fix if (c.warning or not c.ok) else "")
    console.print(table)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")
