"""A SecAgg+ round through `flwr run` on a local simulation SuperLink (e2e), checking VALUES.

Three simulated sites run the real ClientApp with the TEST-ONLY fake site
(tests/fake_site.py: site k sends +(k + 1), patients bucket 10 (k + 1)). With
``secagg = true`` the train phase is Flower's SecAgg+ protocol; the aggregate
must equal the plain FedAvg of the same updates within quantisation error
(SecAgg+ fed the wrong layout "completes" with the adapter unchanged, so a
completed status alone proves nothing). Run with ``pytest -m e2e tests/e2e``.
"""

import numpy as np
import pytest

from tests.e2e.test_simulation import run_simulation

pytestmark = pytest.mark.e2e

R = 4.0  # fake values reach 3 in round 1
SECAGG_KEYS = ('secagg-clipping-range = 1.0\nsecagg-num-shares = 1.0\n'
               'secagg-reconstruction-threshold = 0.6')


def test_secagg_round_equals_plain_fedavg(tmp_path):
    summary, adapter, out = run_simulation(
        tmp_path, sites=3, extra_config=SECAGG_KEYS,
        run_config=f"num-rounds=1 min-sites=2 timeout.wait-sites=120 secagg=true secagg-clipping-range={R}",
    )
    assert summary["status"] == "completed" and summary["secagg"] is True
    rnd = summary["rounds"][0]
    assert rnd["aggregated"] is True, (rnd, out)
    assert len(rnd["train"]["accepted"]) == 3 and sorted(rnd["weights"].values()) == [10, 20, 30]
    plain = (1 * 10 + 2 * 20 + 3 * 30) / 60  # FedAvg of +1, +2, +3 weighted 10, 20, 30
    q = [round(w / 1000 * 2**22) for w in (10, 20, 30)]
    bound = 3 * (2 * R / 2**22) / (sum(q) / 2**22) + 1e-6
    for value in adapter.values():
        np.testing.assert_allclose(value, plain, atol=bound, rtol=0)
    assert rnd["evaluate"]["mean"] == {"diversity.distinct_1": 0.5}
