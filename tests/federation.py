"""TEST-ONLY in-process federation harness: the real ServerApp loop and ClientApp, no network.

The grids below hand each Message straight to the real ClientApp (client/app.py), which
calls whatever ``client.app.site`` is: in these tests the fake of
tests/fake_site.py, injected by the ``calls`` fixture (tests/conftest.py). :class:`WireGrid`
also sends every message through Flower's protobuf serde both ways, as on the wire.
Shared by tests/server (plain and SecAgg+ rounds) and tests/client (the app's site policy).
"""

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid

from client.app import app as client_app
from server import checkpoint
from server.app import run_federation
from shared.run_config import RunConfig
from tests.fake_site import fake_spec

#: A plain one-round federation of at least two of the fake sites.
RC = {"num-rounds": 1, "min-sites": 2, "lora.r": 2, "timeout.wait-sites": 0}
R = 4.0  # the fake sends values up to 5: a clipping range that covers them
#: The same federation under SecAgg+.
SECAGG_RC = RC | {"secagg": True, "secagg-clipping-range": R}
Q = 2**22  # SecAgg+'s quantisation range (Flower's default)


class InProcessGrid(Grid):
    """Delivers each message to a handler per node (the real ClientApp unless overridden)."""

    def __init__(self, contexts, handlers=None, dropped=(), nodes=None):
        self.contexts, self.handlers, self.dropped = contexts, handlers or {}, set(dropped)
        self.sent: list[Message] = []
        self.nodes = nodes  # NodeInfo-like records for get_nodes() (None: no registry, as old grids)

    def set_run(self, run):  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        if self.nodes is None:
            raise NotImplementedError
        return list(self.nodes)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node not in self.dropped:
                out.append(self.deliver(msg, self.handlers.get(node, client_app), self.contexts[node]))
        return out

    def deliver(self, msg, handler, context):
        """One node's reply to ``msg``."""
        return handler(msg, context)


class WireGrid(InProcessGrid):
    """InProcessGrid, but every message is serialised both ways and exceptions become error replies."""

    def deliver(self, msg, handler, context):
        self.received = getattr(self, "received", [])
        received = message_from_proto(message_to_proto(msg))
        try:
            reply = handler(received, context)
        except Exception as exc:  # as Flower's runtime does
            reply = Message(Error(code=1, reason=f"{type(exc)}:<'{exc}'>"), reply_to=received)
        reply = message_from_proto(message_to_proto(reply))
        self.received.append(reply)
        return reply


def contexts(tmp_path, run_config, n=4):
    """Node contexts of ``n`` fake sites ``site0``.. (node ids 100..), each with its own output dir."""
    return {
        100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config=run_config,
                         node_config={"site-id": f"site{k}", "output-dir": str(tmp_path / f"s{k}")})
        for k in range(n)
    }


def site_floors_for_two_fake_sites(monkeypatch):
    """Site floors (client/policy.py) as the in-process harness needs them.

    Two sites form a SecAgg+ group (the default floor is 3), and one test runs a
    single-site federation (min-sites 1).
    """
    monkeypatch.setenv("FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE", "2")
    monkeypatch.setenv("FEDSYNTH_SITE_MIN_SITES", "1")


def coordinator_knows_the_fake_spec(monkeypatch):
    """The coordinator's round-1 spec is the fake sites' (tests/server/test_app_wire.py checks
    that a tiny config.json with lora.targets = q_proj gives exactly this spec)."""
    import server.app

    monkeypatch.setattr(server.app, "run_adapter_spec", lambda run, settings=None: fake_spec(run))


def quantisation_bound(weights, max_weight=1000):
    """Largest error per coordinate of SecAgg+'s weighted mean: n steps of 2R/Q over sum(q_i)/Q."""
    q = [round(w / max_weight * Q) for w in weights]
    return len(weights) * (2 * R / Q) / (sum(q) / Q) + 1e-6


def run_over_wire(tmp_path, rc, n=2, handlers=None, dropped=(), name="run"):
    """One federation of ``n`` fake sites through :class:`WireGrid`; (summary, last adapter or None, grid)."""
    ctx = contexts(tmp_path, rc, n=n)
    grid = WireGrid(ctx, handlers=handlers, dropped=dropped)
    summary = run_federation(grid, RunConfig.from_flower(rc), run_dir=tmp_path / name, sleep=lambda s: None)
    latest = checkpoint.load_latest(tmp_path / name / "checkpoints")
    return summary, (latest[1] if latest else None), grid
