"""The site's pin of the agreed bundle and the check of a task's bundle against it."""

import hashlib
import json

import pytest
from flwr.cli.build import build_fab_from_disk

from client.bundle_trust import (
    BundleId,
    bundle_id,
    launcher_log_path,
    load_pin,
    verify_bundle,
    write_pin,
)
from shared.errors import InputError, VerificationError
from tests.client.app_bundles import MARKER_APP, agreed_bundle, make_app


@pytest.fixture()
def agreed(tmp_path):
    return agreed_bundle(tmp_path)


def test_pin_is_what_flwr_run_sends(agreed, tmp_path):
    fab = build_fab_from_disk(agreed.app)
    assert agreed.pin == BundleId("fedsynth", "fedsynth", "0.1.0", hashlib.sha256(fab).hexdigest())
    assert load_pin(agreed.pin_path) == agreed.pin
    (tmp_path / "x.fab").write_bytes(fab)  # pinning the .fab file gives the same pin
    assert write_pin(tmp_path / "x.fab", tmp_path / "pin2.json") == agreed.pin
    # deterministic: rebuilding the same tree gives the same bytes
    assert build_fab_from_disk(agreed.app) == fab


def test_same_bundle_accepted(agreed):
    fab = build_fab_from_disk(agreed.app)
    got = verify_bundle(fab, agreed.pin, claimed_hash=hashlib.sha256(fab).hexdigest(),
                        fab_id="fedsynth/fedsynth", fab_version="0.1.0")
    assert got == agreed.pin
    assert not agreed.marker.exists()


def test_modified_client_code_refused_and_never_imported(agreed):
    (agreed.app / "client" / "app.py").write_text(
        MARKER_APP.format(marker=str(agreed.marker)) + "import os  # one extra line\n")
    fab = build_fab_from_disk(agreed.app)
    with pytest.raises(VerificationError) as err:
        verify_bundle(fab, agreed.pin, fab_id="fedsynth/fedsynth", fab_version="0.1.0")
    assert [p.where for p in err.value.problems] == ["bundle.sha256"]
    assert not agreed.marker.exists()


def test_every_mismatch_listed(agreed):
    make_app(agreed.app, agreed.marker, version="0.2.0")
    fab = build_fab_from_disk(agreed.app)
    with pytest.raises(VerificationError) as err:
        verify_bundle(fab, agreed.pin, claimed_hash="0" * 64, fab_id="evil/fedsynth",
                      fab_version="0.2.0")
    where = {p.where for p in err.value.problems}
    assert where == {"bundle.sha256", "run.fab_hash", "bundle.version", "run.fab_id",
                     "run.fab_version"}


def test_garbage_bundle_refused():
    with pytest.raises(VerificationError) as err:
        verify_bundle(b"not a zip", BundleId("fedsynth", "fedsynth", "0.1.0", "a" * 64))
    assert {p.where for p in err.value.problems} == {"bundle", "bundle.sha256"}
    with pytest.raises(InputError):
        bundle_id(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: no pyproject


def test_bad_pin_file_lists_every_problem(tmp_path):
    path = tmp_path / "pin.json"
    path.write_text(json.dumps({"publisher": "", "name": "fedsynth", "sha256": "XYZ", "extra": 1}))
    with pytest.raises(InputError) as err:
        load_pin(path)
    reasons = {p.where.rsplit(":", 1)[-1] for p in err.value.problems}
    assert reasons == {"publisher", "version", "sha256", "extra"}


def test_refusal_log_is_its_own_chain_beside_the_site_log(tmp_path):
    assert launcher_log_path(tmp_path / "audit.jsonl") == tmp_path / "launcher.audit.jsonl"
    assert launcher_log_path(tmp_path) == tmp_path / "launcher.audit.jsonl"
    assert launcher_log_path(tmp_path / "launcher.audit.jsonl") == tmp_path / "launcher.audit.jsonl"
