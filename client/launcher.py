"""The site's trusted ClientApp launcher: a site runs only the fedsynth code it installed.

Flower's own code trust (``flower-supernode --trusted-entities``) only accepts
bundles signed by Flower's online hub, so an air-gapped consortium cannot use
it. Instead the SuperNode runs with ``--isolation process`` (it then starts no
ClientApp itself) and this launcher takes its place:

``python -m client.launcher serve --runtime-api-address 127.0.0.1:9094 --insecure --pin pin.json
--superexec-auth-secret-file superexec.secret``
    polls the SuperNode's local Runtime API for ClientApp tasks (what
    ``flower-superexec`` does) and starts one ``task`` process per task, with
    the task token on stdin (not on the command line, where ``ps`` shows it).
    With the secret file (the same one the SuperNode gets as
    ``--superexec-auth-secret-file``; Flower 1.39, experimental, process isolation
    only) the poll requests are HMAC-signed with Flower's
    ``SuperExecAuthHttpInterceptor``, so no other local process can claim the
    site's tasks. Flower signs only AcquireTask, PullPendingTasks and ClaimTask;
    a task process authenticates with its task token. The secret cannot stop a
    process that binds the Runtime API port before the SuperNode does and feeds
    the ClientApp its own node config: the site floors (:mod:`client.policy`)
    stop that, so both are needed.

``task`` (one task, mirrors ``flwr-clientapp``'s ``run_clientapp``)
    pulls the task input (token-bound: run, context, app bundle, message),
    computes sha256 over the bundle's bytes and reads publisher/name/version
    from the bundle's ``pyproject.toml`` (parsed as TOML from the in-memory zip:
    nothing is extracted, installed or imported), and compares them with the
    site's pin. On any difference the task is REFUSED: the refusal is logged
    locally (and, with ``--audit-log``, to ``launcher.audit.jsonl`` beside it: its own
    chain, actor ``<site>-launcher``, signed with ``--signing-key``) and the
    coordinator gets an error reply with the fixed reason
    ``bundle_not_trusted``; the round goes on without this site. On a match it
    imports ``client.app`` from the site's own installation (the package this
    file belongs to; the bundle is never put on ``sys.path``) and runs it.

``python -m client.launcher pin APP_DIR_OR_FAB --out pin.json``
    writes the pin at install time: publisher, name, version and the sha256
    of the app bundle exactly as ``flwr run APP_DIR`` builds it (Flower builds
    bundles deterministically: sorted files, fixed zip dates), or of a ``.fab``
    file. Pin the same directory/bundle the consortium agreed to run.

Why pin the whole bundle when only local code runs: the bundle also carries
the run-config defaults and the ServerApp the coordinator runs against this
site; pinning it makes "the consortium runs the agreed release" checkable at
every site, and a coordinator that edits anything gets no site to work for it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError, Problem, VerificationError

log = logging.getLogger("fedsynth.launcher")
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "requests")

PIN_FIELDS = ("publisher", "name", "version", "sha256")
REFUSAL_REASON = "bundle_not_trusted"
_MAX_PYPROJECT = 1 << 20  # bytes; a bundle's pyproject is a few KiB
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the dir holding client/ and shared/


@dataclass(frozen=True)
class BundleId:
    """What identifies an app bundle: Flower's app id parts and sha256 of the bundle bytes (hex)."""

    publisher: str
    name: str
    version: str
    sha256: str


def bundle_id(fab: bytes) -> BundleId:
    """Identify a bundle from its bytes without extracting or executing anything.

    Raises :class:`InputError` when the bytes are not a zip with a readable
    ``pyproject.toml`` carrying ``[project] name/version`` and
    ``[tool.flwr.app] publisher``.
    """
    digest = hashlib.sha256(fab).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            info = zf.getinfo("pyproject.toml")
            if info.file_size > _MAX_PYPROJECT:
                raise ValueError("pyproject.toml too large")
            with zf.open(info) as fh:
                config = tomllib.loads(fh.read(_MAX_PYPROJECT + 1).decode("utf-8"))
        project = config["project"]
        fields = (config["tool"]["flwr"]["app"]["publisher"], project["name"], project["version"])
    except Exception as exc:  # any malformed bundle is one refusal, never a crash
        raise InputError("not a readable app bundle",
                         [Problem("bundle", f"{type(exc).__name__}: {exc!s:.120}")]) from None
    if not all(isinstance(f, str) and f for f in fields):
        raise InputError("not a readable app bundle", [Problem("bundle", "empty publisher/name/version")])
    return BundleId(*fields, sha256=digest)


def build_bundle(path: Path | str) -> bytes:
    """The bundle bytes for an app directory (exactly what ``flwr run DIR`` sends) or a ``.fab`` file."""
    p = Path(path)
    if p.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return build_fab_from_disk(p)
    if p.is_file():
        return p.read_bytes()
    raise InputError("cannot pin", [Problem(str(p), "neither an app directory nor a .fab file")])


def write_pin(source: Path | str, out: Path | str) -> BundleId:
    """Pin the bundle built from ``source`` (dir or .fab) into the JSON file ``out``."""
    ident = bundle_id(build_bundle(source))
    Path(out).write_text(json.dumps(asdict(ident), indent=2, sort_keys=True) + "\n")
    return ident


def load_pin(path: Path | str) -> BundleId:
    """Read a pin file; every missing or malformed field is listed in one :class:`InputError`."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError("cannot read pin", [Problem(str(path), type(exc).__name__)]) from None
    if not isinstance(raw, dict):
        raise InputError("cannot read pin", [Problem(str(path), "not a JSON object")])
    problems = [Problem(f"{path}:{k}", "missing or not a non-empty string")
                for k in PIN_FIELDS if not isinstance(raw.get(k), str) or not raw.get(k)]
    problems += [Problem(f"{path}:{k}", "unknown field") for k in sorted(set(raw) - set(PIN_FIELDS))]
    sha = raw.get("sha256")
    if isinstance(sha, str) and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        problems.append(Problem(f"{path}:sha256", "not 64 lowercase hex digits"))
    if problems:
        raise InputError("invalid pin file", problems)
    return BundleId(**{k: raw[k] for k in PIN_FIELDS})


def verify_bundle(fab: bytes, pin: BundleId, *, claimed_hash: str = "", fab_id: str = "",
                  fab_version: str = "") -> BundleId:
    """Refuse (:class:`VerificationError`, every mismatch listed) unless ``fab`` is the pinned bundle.

    ``claimed_hash``/``fab_id``/``fab_version`` are what the SuperLink says about
    the run (``Fab.hash_str``, ``Run.fab_id`` = ``publisher/name``,
    ``Run.fab_version``); when given they must agree with the bytes and the pin.
    """
    problems: list[Problem] = []
    digest = hashlib.sha256(fab).hexdigest()
    try:
        got: BundleId | None = bundle_id(fab)
    except InputError as exc:
        got = None
        problems.extend(exc.problems)
    if digest != pin.sha256:
        problems.append(Problem("bundle.sha256", f"{digest} != pinned {pin.sha256}"))
    if claimed_hash and claimed_hash != digest:
        problems.append(Problem("run.fab_hash", "the SuperLink's hash does not match the bytes"))
    if got is not None:
        for field in ("publisher", "name", "version"):
            if getattr(got, field) != getattr(pin, field):
                problems.append(Problem(f"bundle.{field}",
                                        f"{getattr(got, field)!r:.80} != pinned {getattr(pin, field)!r}"))
    if fab_id and fab_id != f"{pin.publisher}/{pin.name}":
        problems.append(Problem("run.fab_id", f"{fab_id!r:.80} != pinned {pin.publisher}/{pin.name}"))
    if fab_version and fab_version != pin.version:
        problems.append(Problem("run.fab_version", f"{fab_version!r:.40} != pinned {pin.version!r}"))
    if problems or got is None:
        raise VerificationError("app bundle not trusted by this site", problems)
    return got


def local_client_app() -> Any:
    """The ClientApp from this site's installation (never from a bundle)."""
    module = importlib.import_module("client.app")
    where = Path(module.__file__ or "").resolve()
    if where.parent != Path(__file__).resolve().parent:
        raise VerificationError("client.app is not the installed one",
                                [Problem(str(where), f"not beside {Path(__file__).resolve()}")])
    return module.app


LAUNCHER_LOG = "launcher.audit.jsonl"  # shared.verify_trail.LAUNCHER_LOG: its own chain


def launcher_log_path(audit_log: Path) -> Path:
    """The launcher's refusal log: ``launcher.audit.jsonl`` (beside ``audit_log`` unless so named).

    Never the site's own ``audit.jsonl``: a second writer there (another actor) would
    make the site's log fail verification; the launcher keeps its own chain instead.
    """
    audit_log = Path(audit_log)
    if audit_log.name == LAUNCHER_LOG:
        return audit_log
    return (audit_log if audit_log.is_dir() else audit_log.parent) / LAUNCHER_LOG


def _audit(audit_log: Path | None, site: str, data: dict[str, Any],
           signing_key: Path | None = None) -> None:
    """Append a refusal to the launcher log, signed with the site key, actor ``<site>-launcher``."""
    if audit_log is None:
        return
    try:
        from shared.audit import AuditLog
        from shared.signing import load_private_key

        if signing_key is None:
            log.warning("no --signing-key: the refusal goes into %s unsigned; fedsynth-verify will "
                        "refuse that log", launcher_log_path(audit_log))
        key = load_private_key(signing_key) if signing_key is not None else None
        AuditLog(launcher_log_path(audit_log), key=key, actor=f"{site}-launcher").append(
            "update_rejected", data)
    except Exception:  # the local log line above is the record of last resort
        log.exception("could not write the refusal to the audit log %s", audit_log)


# The Runtime API methods a SuperNode started with --superexec-auth-secret-file verifies
# (Flower 1.39: flwr.supercore.superexec.run_superexec._SUPEREXEC_AUTH_METHODS, private there).
SUPEREXEC_AUTH_METHODS = frozenset({
    "/flwr.proto.Runtime/AcquireTask",
    "/flwr.proto.Runtime/PullPendingTasks",
    "/flwr.proto.Runtime/ClaimTask",
})


def load_superexec_secret(path: Path | str) -> bytes:
    """The SuperExec shared secret: the file's exact bytes (as the SuperNode reads it), non-empty."""
    from flwr.supercore.auth import load_superexec_auth_secret

    try:
        secret = load_superexec_auth_secret(str(path))
    except ValueError as exc:
        raise InputError("cannot read the SuperExec auth secret", [Problem(str(path), str(exc)[:160])]) from None
    if not secret:
        raise InputError("cannot read the SuperExec auth secret", [Problem(str(path), "empty")])
    return secret


def runtime_interceptors(token: str | None, superexec_secret: bytes | None = None) -> list[Any]:
    """Flower's HTTP interceptors for a Runtime API client: version, then the task token (a task
    process) or the SuperExec HMAC signature (the poller, when the site has a secret)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
        component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if superexec_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=superexec_secret, protected_methods=SUPEREXEC_AUTH_METHODS))
    return interceptors


def _runtime_client(address: str, token: str | None, insecure: bool, root_certificates: str | None,
                    superexec_secret: bytes | None = None):
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    interceptors = runtime_interceptors(token, superexec_secret)
    invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors, retry_invoker=invoker)
    return client, invoker


def run_task(address: str, token: str, pin: BundleId, *, insecure: bool,
             root_certificates: str | None = None, audit_log: Path | None = None,
             site: str = "site", signing_key: Path | None = None) -> bool:
    """Handle one ClientApp task; True when the local ClientApp ran, False when refused or failed."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client, invoker = _runtime_client(address, token, insecure, root_certificates)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = message = reply = None
    status, details, ran = SubStatus.FAILED, "ClientApp task failed", False
    try:
        message, context, run, fab = pull_task_input(client)
        try:
            ident = verify_bundle(fab.content, pin, claimed_hash=fab.hash_str,
                                  fab_id=run.fab_id, fab_version=run.fab_version)
        except VerificationError as exc:
            log.error("REFUSED run %s: %s", run.run_id, exc)  # the message lists every problem
            _audit(audit_log, site, {"reason": REFUSAL_REASON, "run_id": str(run.run_id),
                                     "bundle_sha256": hashlib.sha256(fab.content).hexdigest()},
                   signing_key)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=REFUSAL_REASON), reply_to=message)
            details = REFUSAL_REASON
        else:
            log.info("run %s: bundle %s/%s %s sha256 %s matches the pin", run.run_id,
                     ident.publisher, ident.name, ident.version, ident.sha256[:16])
            t0 = time.monotonic()
            log.info("run %s round %s: %s started", run.run_id, *task_phase(message))
            reply = local_client_app()(message=message, context=context)
            log.info("run %s round %s: %s done in %.0f s: %s", run.run_id, *task_phase(message),
                     time.monotonic() - t0, reply_outcome(reply))
            status, details, ran = SubStatus.COMPLETED, "", True
    except Exception:
        # client.app already turns site failures into typed declines; reaching
        # here is a launcher/transport fault. No exception text goes out.
        log.exception("task failed in the launcher")
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="site_error"),
                            reply_to=message)
        details = "site_error"
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("could not push the reply")
            ran = False
        invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return ran


def task_phase(message: Any) -> tuple[str, str]:
    """(round, phase) of a ClientApp task for the log: phase ``train``, ``train (SecAgg+ stage)``,
    ``evaluate`` or the message type; round from the message's group id ("?" when absent)."""
    meta = message.metadata
    kind = str(getattr(meta, "message_type", "") or "?")
    rnd = str(getattr(meta, "group_id", "") or "?")
    try:
        configs = message.content.config_records
        if kind == "train" and "instruction" not in configs:
            kind = "train (SecAgg+ stage)"
    except Exception:  # noqa: BLE001 - a log line only
        pass
    return (rnd if rnd.isdigit() else "?"), kind


def reply_outcome(reply: Any) -> str:
    """What the site answered, for its own log: a decline reason, or the cumulative ε it reported.

    Reads only the site's own reply (whitelisted scalars: ``reason``, ``epsilon``,
    ``epsilon_round``); never metrics values or anything from the notes.
    """
    try:
        if reply.has_error():
            return f"error ({reply.error.reason})"
        for name, record in reply.content.config_records.items():
            if "reason" in record and name.endswith("decline"):
                return f"declined ({record['reason']})"
            if "epsilon" in record:
                eps, per_round = float(record["epsilon"]), record.get("epsilon_round")
                more = f", this round {float(per_round):.3g}" if per_round is not None else ""
                return f"update sent, ε spent {eps:.3g}{more}"
        return "reply sent"
    except Exception:  # noqa: BLE001 - a log line only
        return "reply sent"


def serve(address: str, pin_path: Path, *, insecure: bool, root_certificates: str | None = None,
          audit_log: Path | None = None, site: str = "site", poll_s: float = 1.0,
          superexec_secret_file: Path | None = None, signing_key: Path | None = None) -> None:
    """Poll the SuperNode's Runtime API forever; one ``task`` process per acquired ClientApp task.

    ``superexec_secret_file``: sign the polls (see the module docstring); every deploy
    path (deploy/site.sh) passes it. Without it the Runtime API is unauthenticated.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    load_pin(pin_path)  # fail at start, not at the first round
    secret = load_superexec_secret(superexec_secret_file) if superexec_secret_file else None
    if secret is None:
        log.warning("no --superexec-auth-secret-file: the SuperNode's Runtime API is unauthenticated")
    client, _ = _runtime_client(address, None, insecure, root_certificates, secret)
    children: list[subprocess.Popen] = []
    log.info("launcher serving %s with pin %s (site code from %s)", address, pin_path, _PACKAGE_ROOT)
    while True:
        children = [c for c in children if c.poll() is None]
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            cmd = [sys.executable, "-m", "client.launcher", "task", "--runtime-api-address", address,
                   "--pin", str(pin_path), "--site", site]
            cmd += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
            if audit_log is not None:
                cmd += ["--audit-log", str(audit_log)]
            if signing_key is not None:
                cmd += ["--signing-key", str(signing_key)]
            # cwd = the installation root, so `-m client.launcher` and `client.app`
            # resolve to this site's code whatever directory serve was started in.
            child = subprocess.Popen(cmd, stdin=subprocess.PIPE, cwd=_PACKAGE_ROOT, text=True)
            child.stdin.write(res.token + "\n")
            child.stdin.close()
            children.append(child)
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``pin``, ``serve``, ``task`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m client.launcher", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_pin = sub.add_parser("pin", help="pin an app directory or .fab at install time")
    p_pin.add_argument("source")
    p_pin.add_argument("--out", required=True)
    for name in ("serve", "task"):
        p = sub.add_parser(name)
        p.add_argument("--runtime-api-address", "--clientappio-api-address", dest="address", required=True)
        p.add_argument("--pin", required=True, type=Path)
        tls = p.add_mutually_exclusive_group(required=True)
        tls.add_argument("--insecure", action="store_true", help="plain HTTP to a local Runtime API")
        tls.add_argument("--root-certificates")
        p.add_argument("--audit-log", type=Path)
        p.add_argument("--site", default=os.environ.get("FEDSYNTH_SITE_SITE_ID", "site"))
        p.add_argument("--signing-key", type=Path,
                       default=os.environ.get("FEDSYNTH_SITE_SIGNING_KEY") or None,
                       help="the site's Ed25519 key: signs the refusal log (launcher.audit.jsonl)")
    sub.choices["serve"].add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    sub.choices["serve"].add_argument(
        "--superexec-auth-secret-file", type=Path, default=None,
        help="the SuperNode's --superexec-auth-secret-file: sign AcquireTask/PullPendingTasks/ClaimTask")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in QUIET_LOGGERS:  # one line per poll request (every --poll seconds): drop below WARNING
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.cmd == "pin":
        ident = write_pin(args.source, args.out)
        print(json.dumps(asdict(ident)))
        return 0
    if args.cmd == "serve":
        serve(args.address, args.pin, insecure=args.insecure, root_certificates=args.root_certificates,
              audit_log=args.audit_log, site=args.site, poll_s=args.poll,
              superexec_secret_file=args.superexec_auth_secret_file, signing_key=args.signing_key)
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        parser.error("task expects the task token on stdin")
    ran = run_task(args.address, token, load_pin(args.pin), insecure=args.insecure,
                   root_certificates=args.root_certificates, audit_log=args.audit_log, site=args.site,
                   signing_key=args.signing_key)
    return 0 if ran else 3


if __name__ == "__main__":
    raise SystemExit(main())
