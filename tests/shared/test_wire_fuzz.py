"""Fuzz: any malformed message is a typed refusal (WireError), never an exception (issue #13 §1).

Thousands of records with wrong types, lists where scalars belong, huge,
negative and NaN numbers, long strings, odd unicode, wrong record kinds and
random array payloads go through ``check_reply``, ``check_instruction`` and the
SecAgg+ checks. Each must return or raise :class:`WireError`, and the refusal
must come from the checks themselves, not from :func:`shared.wire.fail_closed`'s
safety net (whose reason is :data:`shared.wire.INTERNAL_FAILURE`): a check that
crashes on an input fails this test even though the run would survive it.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import wire, wire_adapter, wire_secagg, wire_version
from shared.errors import WireError
from shared.privacy_scalars import PRIVACY_KEYS
from shared.run_config import RunConfig

RUN = RunConfig.from_flower({"lora.r": 2})
SECURE_RUN = RunConfig.from_flower({"lora.r": 2, "train.secure-mode": True, "aggregation.weighting": "uniform"})
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPEC = {A: ((2, 8), "float32"), B: ((8, 2), "float32")}
GOOD_PRIVACY = dict(epsilon=1.5, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.01,
                    steps=50, max_grad_norm=1.0, accountant="prv", secure_mode=False,
                    patients_bucket=120, ledger_seq=3, ledger_head="ab" * 32)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

odd_text = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=80),
    st.sampled_from(["prv", "rdp", "budget_exceeded", "round", "\u202eprv", "prv\n", "ab" * 32,
                     "AB" * 32, "\udc80", "x" * 5_000, A, B, "", "NaN"]),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, -(2**63), 10**400, -(10**400), 123, 1_000_001]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324]),
)
scalars = st.one_of(numbers, odd_text, st.booleans(), st.binary(max_size=64))
config_values = st.one_of(
    scalars,
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5),
    st.lists(st.floats(), max_size=5),
    st.lists(odd_text, max_size=5),
    st.lists(st.booleans(), max_size=5),
    st.lists(st.binary(max_size=8), max_size=3),
)
keys = st.one_of(st.sampled_from(sorted(PRIVACY_KEYS) + ["reason", "round", "names", "num_examples",
                                                          "code", "message", "decline"]), odd_text)


def _config(d: dict) -> ConfigRecord:
    try:
        return ConfigRecord(d)
    except Exception:  # Flower refuses the value itself: nothing would reach the checks
        assume(False)
        raise


def _metric(d: dict) -> MetricRecord:
    try:
        return MetricRecord(d)
    except Exception:
        assume(False)
        raise


@st.composite
def privacy_records(draw):
    """The honest privacy record with some keys replaced, dropped or added."""
    d = dict(GOOD_PRIVACY)
    for key in draw(st.lists(keys, max_size=4)):
        action = draw(st.sampled_from(["set", "drop"]))
        if action == "drop":
            d.pop(key, None)
        else:
            d[key] = draw(config_values)
    kind = draw(st.sampled_from(["config", "config", "config", "metric", "array"]))
    if kind == "metric":
        numeric = {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        return _metric(numeric)
    if kind == "array":
        return ArrayRecord()
    return _config(d)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "uint8", "float16", "bool"]))
    shape = draw(st.sampled_from([(2, 8), (8, 2), (0,), (2,), (1, 1, 1), (16, 2), ()]))
    if draw(st.booleans()):
        value = np.full(shape, draw(st.sampled_from([0, 1, np.nan, np.inf, -1e30])), dtype=np.float64)
        return Array(value.astype(dtype))
    blob = draw(st.binary(max_size=256))
    return Array(dtype=dtype, shape=tuple(shape), stype=draw(st.sampled_from(["numpy.ndarray", "x"])),
                 data=blob)


@st.composite
def adapters(draw):
    names = draw(st.lists(st.one_of(st.sampled_from([A, B, A.replace("q_proj", "v_proj")]), odd_text),
                          max_size=4, unique=True))
    record = ArrayRecord()
    for name in names:
        record[name] = draw(arrays())
    return record


records = st.one_of(privacy_records(), adapters(),
                    st.dictionaries(keys, config_values, max_size=4).map(_config),
                    st.dictionaries(keys, numbers, max_size=3).map(_metric))


@st.composite
def train_replies(draw):
    content = RecordDict()
    base = [("adapter", adapters()), ("privacy", privacy_records()), ("metrics", records),
            ("decline", st.dictionaries(keys, config_values, max_size=2).map(_config))]
    # Mostly a current peer (so the checks past the version gate are fuzzed), sometimes any record.
    version = draw(st.sampled_from(["current", "current", "current", "fuzzed", "absent"]))
    if version == "current":
        content[wire_version.WIRE_KEY] = wire_version.wire_record()
    elif version == "fuzzed":
        content[wire_version.WIRE_KEY] = draw(records)
    for key, strategy in base:
        if draw(st.booleans()):
            content[key] = draw(strategy)
    for key in draw(st.lists(odd_text, max_size=2)):
        content[key] = draw(records)
    return content


def _no_crash(call, *args, **kwargs):
    """The check returns or refuses with its own problems, never the fallback."""
    try:
        call(*args, **kwargs)
    except WireError as err:
        internal = [p for p in err.problems if wire.INTERNAL_FAILURE in p.reason]
        assert not internal, f"a check raised internally: {internal}"


@FUZZ
@given(content=train_replies(), kind=st.sampled_from(["train", "evaluate"]),
       spec=st.sampled_from([SPEC, None]), run=st.sampled_from([RUN, SECURE_RUN]))
def test_check_reply_never_raises(content, kind, spec, run):
    _no_crash(wire.check_reply, content, kind=kind, spec=spec, run=run)


@FUZZ
@given(privacy=privacy_records())
def test_privacy_record_alone_never_raises(privacy):
    content = RecordDict({"adapter": wire_adapter.pack_adapter({A: np.zeros((2, 8), np.float32),
                                                        B: np.zeros((8, 2), np.float32)}),
                          "privacy": privacy, wire_version.WIRE_KEY: wire_version.wire_record()})
    _no_crash(wire.check_reply, content, kind="train", spec=SPEC, run=RUN)


@FUZZ
@given(instruction=st.dictionaries(keys, config_values, max_size=3), adapter=st.none() | adapters(),
       extra=st.lists(odd_text, max_size=2), data=st.data())
def test_check_instruction_never_raises(instruction, adapter, extra, data):
    if data.draw(st.booleans()):  # a current coordinator, so the checks past the version gate are fuzzed
        instruction = {**instruction, wire_version.WIRE_VERSION_FIELD: wire_version.WIRE_VERSION}
    content = RecordDict({"instruction": _config(instruction)})
    if adapter is not None:
        content["adapter"] = adapter
    for key in extra:
        content[key] = data.draw(records)
    _no_crash(wire.check_instruction, content, spec=SPEC, run=RUN)


@st.composite
def secagg_replies(draw):
    good = {A: np.full((2, 8), 0.25), B: np.zeros((8, 2))}
    content = wire_secagg.pack_secagg_reply(good, weight=120, privacy=GOOD_PRIVACY)
    targets = [wire_secagg.FITRES_METRICS, wire_secagg.FITRES_NUM_EXAMPLES, wire_secagg.FITRES_STATUS,
               wire_secagg.SECAGG_LAYOUT_KEY, wire_version.WIRE_KEY, wire_secagg.FITRES_PARAMETERS, wire_secagg.SECAGG_CONFIGS_KEY]
    for key in draw(st.lists(st.sampled_from(targets), min_size=1, max_size=3, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            content[key] = draw(privacy_records())
        elif choice == 1:
            content[key] = draw(records)
        elif choice == 2 and key in content:
            del content[key]
        else:
            content[key] = _config({wire_secagg.SECAGG_MASKED_KEY: draw(st.lists(st.binary(max_size=64),
                                                                                 max_size=3))})
    return content


@FUZZ
@given(content=secagg_replies(), masked=st.booleans(), spec=st.sampled_from([SPEC, None]))
def test_check_secagg_reply_never_raises(content, masked, spec):
    _no_crash(wire_secagg.check_secagg_reply, content, spec=spec, run=RUN, masked=masked)


@FUZZ
@given(params=adapters(), cfg=st.dictionaries(keys, config_values, max_size=3),
       numbered=st.booleans())
def test_unpack_secagg_instruction_never_raises(params, cfg, numbered):
    cfg = {**cfg, wire_version.WIRE_VERSION_FIELD: wire_version.WIRE_VERSION} if numbered else cfg
    if numbered:  # the legacy "0".."n-1" keys, so the arrays are decoded and re-labelled
        renamed = ArrayRecord()
        for i, (_name, arr) in enumerate(params.items()):
            renamed[str(i)] = arr
        params = renamed
    content = RecordDict({"fitins.parameters": params, "fitins.config": _config(cfg),
                          wire_secagg.SECAGG_CONFIGS_KEY: ConfigRecord({})})
    _no_crash(wire_secagg.unpack_secagg_instruction, content, spec=SPEC, run=RUN)


def test_fallback_is_typed_and_drops_the_message():
    """The safety net itself: a check that raises gives a WireError without the exception text."""
    secret = "Jane Roe MRN 998877"

    @wire.fail_closed("probe")
    def broken():
        raise TypeError(secret)

    with pytest.raises(WireError) as err:
        broken()
    assert secret not in str(err.value)
    assert wire.INTERNAL_FAILURE in err.value.problems[0].reason
