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
    file belongs to; the bundle is never put on ``sys.path``) and runs it. The pin,
    the check and the refusal log are :mod:`client.bundle_trust`.

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
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.bundle_trust import (
    REFUSAL_REASON,
    BundleId,
    load_pin,
    record_refusal,
    verify_bundle,
    write_pin,
)
from shared.errors import InputError, Problem, VerificationError

log = logging.getLogger("fedsynth.launcher")
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "requests")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the dir holding client/ and shared/


def local_client_app() -> Any:
    """The ClientApp from this site's installation (never from a bundle)."""
    module = importlib.import_module("client.app")
    where = Path(module.__file__ or "").resolve()
    if where.parent != Path(__file__).resolve().parent:
        raise VerificationError("client.app is not the installed one",
                                [Problem(str(where), f"not beside {Path(__file__).resolve()}")])
    return module.app


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
            record_refusal(audit_log, site, {"reason": REFUSAL_REASON, "run_id": str(run.run_id),
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
