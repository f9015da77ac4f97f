"""Test-wide environment: nothing phones out, nothing is fetched from a hub."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One torch thread: the suite runs tiny models, where thread start-up costs more
# than it saves, and a busy 2-core machine makes multi-threaded torch crawl.
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def calls(monkeypatch):
    """The fake site (tests/fake_site.py) as ``client.site``; returns the list its calls go to.

    Also sets the task identity the Flower runtime gives the ServerApp process, the site
    floors two in-process sites need, and the coordinator's round-1 spec to the fake's.
    """
    from flwr.supercore.task_identity import TaskIdentity

    from tests.fake_site import make_fake_site
    from tests.federation import coordinator_knows_the_fake_spec, site_floors_for_two_fake_sites

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    log = []
    monkeypatch.setattr("client.app.site", make_fake_site(log))
    site_floors_for_two_fake_sites(monkeypatch)
    coordinator_knows_the_fake_spec(monkeypatch)
    return log
