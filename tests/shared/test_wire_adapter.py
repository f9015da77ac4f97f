"""The adapter record (shared.wire_adapter): packing round-trips, and every tensor that is not
exactly the run's LoRA layout, dtype, finite values and canonical bytes is refused."""

import io

import numpy as np
from flwr.app import Array, ConfigRecord, RecordDict

from shared import wire, wire_adapter, wire_pack
from shared.errors import Problem
from tests.shared.wire_samples import RUN, SECRET, SPEC, A, B, adapter, privacy, refused


def test_pack_unpack_round_trip_and_spec():
    record = wire_adapter.pack_adapter(adapter())
    assert list(record) == sorted(adapter())
    back = wire_adapter.unpack_adapter(record)
    assert {k: v.tolist() for k, v in back.items()} == {k: v.tolist() for k, v in adapter().items()}
    assert wire_adapter.spec_of(back) == SPEC


def test_check_adapter_record_lists_problems_without_raising():
    problems: list[Problem] = []
    assert wire_adapter.check_adapter_record("not a record", SPEC, RUN, problems, "adapter") is None
    assert [p.reason for p in problems] == ["must be an ArrayRecord"]
    problems = []
    got = wire_adapter.check_adapter_record(wire_adapter.pack_adapter(adapter()), SPEC, RUN, problems, "adapter")
    assert problems == [] and set(got) == {A, B}


def test_tensor_smuggling():
    # a string as uint8 tensor bytes under an unexpected key
    text = np.frombuffer(SECRET.encode(), dtype=np.uint8).copy()
    tensors = adapter() | {"notes.text": text}
    refused(wire_pack.pack_train_reply(tensors, privacy()), match="unexpected tensor name")
    # same bytes under an expected name: wrong dtype and shape
    refused(wire_pack.pack_train_reply(adapter() | {A: text}, privacy()), match="dtype")
    refused(wire_pack.pack_train_reply(adapter() | {A: np.zeros((3, 8), np.float32)}, privacy()), match="shape")
    refused(wire_pack.pack_train_reply(adapter() | {A: np.zeros((2, 8), np.float64)}, privacy()), match="dtype")
    refused(wire_pack.pack_train_reply({A: adapter()[A]}, privacy()), match="missing tensor")
    for bad in (np.nan, np.inf):
        a = adapter()
        a[B][0, 0] = bad
        refused(wire_pack.pack_train_reply(a, privacy()), match="non-finite")


def test_bytes_appended_after_the_array_refused():
    buf = io.BytesIO()
    np.save(buf, adapter()[A], allow_pickle=False)
    record = wire_adapter.pack_adapter(adapter())
    record[A] = Array(dtype="float32", shape=(2, 8), stype="numpy.ndarray",
                      data=buf.getvalue() + SECRET.encode())
    content = RecordDict({"adapter": record, "privacy": ConfigRecord(privacy())})
    refused(content, match="canonical")
    # declared metadata that lies about the payload
    record = wire_adapter.pack_adapter(adapter())
    record[A] = Array(dtype="float32", shape=(2, 8), stype="numpy.ndarray",
                      data=Array(np.zeros((4, 4), np.float32)).data)
    refused(RecordDict({"adapter": record, "privacy": ConfigRecord(privacy())}), match="declared")


def test_coordinator_side_without_spec_checks_lora_structure():
    ok = wire.check_reply(wire_pack.pack_train_reply(adapter(), privacy()), kind="train", spec=None, run=RUN)
    assert set(ok.adapter) == {A, B}
    refused(wire_pack.pack_train_reply(adapter() | {"lm_head.weight": np.zeros((2, 2), np.float32)}, privacy()),
            spec=None, match="not a PEFT LoRA tensor name")
    refused(wire_pack.pack_train_reply({A: adapter()[A]}, privacy()), spec=None, match="no matching")
    refused(wire_pack.pack_train_reply(adapter() | {A: np.zeros((3, 8), np.float32)}, privacy()), spec=None,
            match="rows")
