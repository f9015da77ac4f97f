import hashlib
import json
import sys
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk

import client.launcher as launcher
from shared.audit import AuditLog, verify_log
from shared.errors import InputError
from shared.signing import generate_key, load_private_key, load_public_key
from tests.client.app_bundles import agreed_bundle


@pytest.fixture()
def agreed(tmp_path):
    return agreed_bundle(tmp_path)


def test_local_client_app_is_the_installed_one():
    app = launcher.local_client_app()
    module = sys.modules["client.app"]
    assert app is module.app
    assert module.__file__.startswith(str(launcher._PACKAGE_ROOT))


class FakeRuntime:
    """Records what the launcher pushes back to the SuperNode's Runtime API."""

    def __init__(self):
        self.pushed = []
        self.outputs = []

    def SendTaskHeartbeat(self, req):  # noqa: N802 - Flower's RPC name
        return SimpleNamespace(success=True)

    def close(self):
        pass


def run_task_with(monkeypatch, fab, pin, local_app=None):
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # Message() reads the task identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    runtime = FakeRuntime()
    message = Message(RecordDict({"instruction": ConfigRecord({"round": 1})}), dst_node_id=7,
                      message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    run = SimpleNamespace(run_id=1, fab_id="fedsynth/fedsynth", fab_version="0.1.0")
    fab_obj = SimpleNamespace(content=fab, hash_str=hashlib.sha256(fab).hexdigest())
    monkeypatch.setattr(launcher, "_runtime_client",
                        lambda *a, **k: (runtime, SimpleNamespace(max_tries=3)))
    monkeypatch.setattr(rc, "pull_task_input", lambda client: (message, context, run, fab_obj))
    monkeypatch.setattr(rc, "push_message", lambda client, reply, ctx: runtime.pushed.append(reply))
    monkeypatch.setattr(rc, "push_task_output",
                        lambda client, context, sub_status, details: runtime.outputs.append(
                            (sub_status, details)))
    if local_app is not None:
        monkeypatch.setattr(launcher, "local_client_app", lambda: local_app)
    return runtime


def test_task_refused_replies_error_and_audits(agreed, monkeypatch, tmp_path):
    (agreed.app / "client" / "app.py").write_text("print('tampered')\n")
    fab = build_fab_from_disk(agreed.app)
    called = []
    runtime = run_task_with(monkeypatch, fab, agreed.pin,
                            local_app=lambda message, context: called.append(1))
    generate_key(tmp_path / "keys" / "site-a.key")
    site_log = tmp_path / "audit.jsonl"  # the deploy default points at the site's own log
    site_audit = AuditLog(site_log, key=load_private_key(tmp_path / "keys" / "site-a.key"), actor="site-a")
    site_audit.append("run_start", {"run_id": "r"})
    ran = launcher.run_task("127.0.0.1:1", "tok", agreed.pin, insecure=True, audit_log=site_log,
                            site="site-a", signing_key=tmp_path / "keys" / "site-a.key")
    assert ran is False and called == []
    (reply,) = runtime.pushed
    assert reply.has_error() and reply.error.reason == "bundle_not_trusted"
    assert runtime.outputs == [("failed", "bundle_not_trusted")]
    assert len(site_log.read_text().splitlines()) == 1  # the site's chain is left alone
    audit = tmp_path / "launcher.audit.jsonl"  # its own chain, signed with the site key
    entry = json.loads(audit.read_text().splitlines()[0])
    assert entry["actor"] == "site-a-launcher" and entry["sig"]
    assert entry["kind"] == "update_rejected" and entry["data"]["reason"] == "bundle_not_trusted"
    pub = {"site-a": load_public_key(tmp_path / "keys" / "site-a.key.pub")}
    assert verify_log(audit, pub) == 1 and verify_log(site_log, pub) == 1
    assert entry["data"]["bundle_sha256"] == hashlib.sha256(fab).hexdigest()
    assert not agreed.marker.exists()


def test_task_accepted_runs_local_app(agreed, monkeypatch):
    fab = build_fab_from_disk(agreed.app)
    seen = []

    def local_app(message, context):
        seen.append(message.metadata.message_type)
        return Message(RecordDict({"decline": ConfigRecord({"reason": "site_error"})}),
                       reply_to=message)

    runtime = run_task_with(monkeypatch, fab, agreed.pin, local_app=local_app)
    assert launcher.run_task("127.0.0.1:1", "tok", agreed.pin, insecure=True) is True
    assert seen == ["train"]
    (reply,) = runtime.pushed
    assert not reply.has_error() and "decline" in reply.content
    assert runtime.outputs == [("completed", "")]
    assert not agreed.marker.exists()  # the bundle's own client/app.py never ran


# ---- SuperExec authentication of the poller (--superexec-auth-secret-file) -----------


def _signed(interceptors, method):
    """Run a Runtime API request through the launcher's interceptors; return (message, headers)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.protobuf.client import ProtobufRequestContext

    msg = AcquireTaskRequest()
    ctx = ProtobufRequestContext(rpc_method=method, message=msg,
                                 request=httpx.Request("POST", "http://127.0.0.1:9094/x"))

    def call(i, c):
        return interceptors[i].intercept(c, lambda c2: call(i + 1, c2)) if i < len(interceptors) \
            else httpx.Response(200)

    call(0, ctx)
    return msg, ctx.request.headers


def _supernode_accepts(secret: bytes, msg, headers, method) -> bool:
    """What Flower's SuperNode checks (flwr.supercore.dependencies.superexec), with its own code."""
    from flwr.supercore.auth import derive_auth_secret
    from flwr.supercore.auth.superexec import verify_superexec_request

    class Nonces:
        seen: set = set()

        def reserve_nonce(self, namespace, nonce, expires_at):
            fresh = nonce not in self.seen
            self.seen.add(nonce)
            return fresh

    names = ("flwr-superexec-ts", "flwr-superexec-nonce", "flwr-superexec-body-sha256",
             "flwr-superexec-signature")
    if any(n not in headers for n in names):
        return False
    ts, nonce, body, sig = (headers[n] for n in names)
    return verify_superexec_request(request=msg, method=method, auth_secret=derive_auth_secret(secret),
                                    timestamp_raw=ts, nonce=nonce, body_sha256_header=body,
                                    signature=sig, nonce_store=Nonces())


def test_poller_signs_what_the_supernode_verifies_and_nothing_else_passes():
    from client.launcher import SUPEREXEC_AUTH_METHODS, runtime_interceptors

    acquire = "/flwr.proto.Runtime/AcquireTask"
    msg, headers = _signed(runtime_interceptors(None, b"site-secret"), acquire)
    assert _supernode_accepts(b"site-secret", msg, headers, acquire)
    # a local process without the secret (or with another one) is refused
    assert not _supernode_accepts(b"other-secret", msg, headers, acquire)
    msg, headers = _signed(runtime_interceptors(None, None), acquire)
    assert not _supernode_accepts(b"site-secret", msg, headers, acquire)
    # the methods are Flower's own list (a private constant there: fail loudly on an upgrade)
    from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS

    assert SUPEREXEC_AUTH_METHODS == _SUPEREXEC_AUTH_METHODS


def test_superexec_secret_file_must_be_readable_and_non_empty(tmp_path):
    from client.launcher import load_superexec_secret

    (tmp_path / "s").write_bytes(b"\x00raw bytes\n")
    assert load_superexec_secret(tmp_path / "s") == b"\x00raw bytes\n"  # exact bytes, as Flower reads them
    (tmp_path / "empty").write_bytes(b"")
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(InputError):
            load_superexec_secret(path)


def test_log_names_phase_round_and_epsilon_not_polls(agreed, tmp_path, monkeypatch):
    import logging

    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    from shared import wire_pack

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as the Flower runtime
        monkeypatch.setattr(TaskIdentity, attr, value)

    msg = Message(wire_pack.pack_instruction(round_id=3, adapter=None), dst_node_id=1,
                  message_type="train", group_id="3")
    assert launcher.task_phase(msg) == ("3", "train")
    ok = Message(wire_pack.pack_train_reply({"a": np.zeros((1, 1), np.float32)},
                                       {"epsilon": 1.25, "epsilon_round": 0.5, "delta": 1e-5}), reply_to=msg)
    assert launcher.reply_outcome(ok) == "update sent, ε spent 1.25, this round 0.5"
    no = Message(wire_pack.pack_decline("budget_exceeded"), reply_to=msg)
    assert launcher.reply_outcome(no) == "declined (budget_exceeded)"
    stage = Message(RecordDict({"secagg": ConfigRecord({"stage": "setup"})}), dst_node_id=1,
                    message_type="train", group_id="3")
    assert launcher.task_phase(stage) == ("3", "train (SecAgg+ stage)")
    assert launcher.main(["pin", str(agreed.app), "--out", str(tmp_path / "p.json")]) == 0
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING  # no line per poll
