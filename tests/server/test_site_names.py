"""Naming the connected nodes (server/site_names.py); the full flow is in tests/server/test_app.py."""

import json
import types

from server.site_names import register_sites
from shared.audit import AuditLog


class Grid:
    def get_nodes(self):
        return [types.SimpleNamespace(node_id=100, name="st-mary", public_key=b"pk"),
                types.SimpleNamespace(node_id=101, name="<b>", public_key=b"")]


def test_register_sites_names_new_nodes_once_and_audits_them(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", key=None, actor="coordinator")
    known = {"101": "node-101"}
    names = register_sites(Grid(), [100, 101], known, audit)
    assert names == {"100": "st-mary", "101": "node-101"} and known == {"101": "node-101"}
    again = register_sites(Grid(), [100, 101], names, audit)
    assert again == names
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    entries = [e["data"] for e in lines if e["kind"] == "site_registered"]
    assert [e["node"] for e in entries] == ["100"]  # once, and never for a node already known
    assert entries[0]["named"] is True and len(entries[0]["public_key_sha256"]) == 64
