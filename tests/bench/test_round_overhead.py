"""bench/round_overhead.py's SecAgg+ case runs a real round under the run config's defaults."""

import pytest

pytestmark = pytest.mark.integration


def test_secagg_bytes_case_aggregates_under_the_default_run_config():
    # The stand-in sites' privacy scalars must pass the wire contract of the run they answer
    # (train.secure-mode is on by default); a round that aggregates nothing raises.
    import client.app
    from bench.round_overhead import bytes_secagg

    real_site = client.app.site
    row = bytes_secagg("embedded", 3)
    assert client.app.site is real_site  # the stand-in sites are gone: later tests get the real ones
    # SecAgg+ sends each float32 weight as a 64-bit masked integer: about twice the raw bytes.
    assert 1.9 < row["masked_ratio"] < 2.3, row
    assert set(row["stage_bytes"]) >= {"setup", "share_keys", "collect_masked_vectors", "unmask"}
