"""Round overhead of the federation: bytes a site sends, aggregation time, simulated round wall time.

Three measurements, each reported against a baseline measured in the same run:

- **bytes** -- the reply a site sends per round (``shared.wire_pack.pack_train_reply``
  of a random adapter of the given shape + the privacy scalars) serialised the
  way Flower 1.39 moves it, divided by the raw adapter size in its wire dtype
  (target <= 1.05x). Two serialisations: Flower's protobuf serde of the whole
  Message (``message_to_proto``, content inline) and the Fleet API requests
  grpc-rere actually sends (``PushMessagesRequest`` with the object tree, then
  one ``PushObjectRequest`` per deflated object; gRPC/HTTP2/TLS framing not
  counted). With SecAgg+ it runs one in-process round of the real ClientApp
  (``client/app.py`` + ``secaggplus_mod``) and ``server/secagg.py`` over a grid
  that serialises every message, and reports the Fleet bytes of each of the four
  messages a site sends (setup, share keys, masked vector, unmask).
- **aggregate** -- ``server.strategy.aggregate`` over N sites of the
  Llama-3-8B-shape adapter (fedavg, trimmed-mean, median; with a norm bound),
  as a ratio to a plain numpy mean over the stacked arrays, same run.
- **simulate** -- a Flower simulation with the TEST-ONLY fake site
  (tests/fake_site.py: no model, no notes), N sites, R rounds: wall time per
  round (train + aggregate + checkpoint + evaluate) from the ServerApp's log
  lines as ``flwr run --stream`` delivers them (batched: coarse), and the
  interval between consecutive rounds' checkpoint files (one full round cycle).

    .venv/bin/python bench/round_overhead.py                       # bytes + aggregate + 5-site sim
    .venv/bin/python bench/round_overhead.py --only simulate --sites 50 --rounds 2
    .venv/bin/python bench/round_overhead.py --json out.json

Adapters are random (sizes and times do not depend on the values); shapes come
from PEFT on a meta-device Llama, so no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import wire_pack, wire_secagg  # noqa: E402
from shared.adapter_spec import AdapterSpec  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # client/pretrain.py RECIPE: the embedded demo model at r=8 (the measured shape; the run default is 16)
    "embedded": dict(r=8, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=3072),
    # Llama-3-8B attention dims (k/v out = 8 kv heads x 128 = 1024), r=16
    "llama-8b": dict(r=16, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BYTES_TARGET = 1.05


def device_name() -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible "
            f"(Python {platform.python_version()}, numpy {np.__version__})")


# ---- adapters --------------------------------------------------------------


def adapter_spec(shape: str, dtype: str = "float32") -> AdapterSpec:
    """PEFT state-dict names and shapes of LoRA on q/k/v/o for ``shape`` (meta device: no memory)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    r = dims.pop("r")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dims))
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    state = get_peft_model_state_dict(peft)
    # get_peft_model_state_dict drops the adapter name; the wire names carry the full PEFT prefix
    return {k: (tuple(v.shape), dtype) for k, v in sorted(state.items())}


def analytic_params(shape: str) -> int:
    """LoRA parameter count from the dimensions alone (checks the PEFT-derived spec)."""
    d = SHAPES[shape]
    h, r, layers = d["hidden_size"], d["r"], d["num_hidden_layers"]
    kv = d["num_key_value_heads"] * (h // d["num_attention_heads"])
    per_layer = sum(r * h + out * r for out in (h, kv, kv, h))  # q, k, v, o: A (r x in) + B (out x r)
    return layers * per_layer


def random_adapter(spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.01).astype(d) for k, (s, d) in spec.items()}


def privacy_scalars(patients_bucket: int = 120, *, secure_mode: bool = False) -> dict[str, Any]:
    return dict(epsilon=2.5, epsilon_round=0.5, delta=1e-5, noise_multiplier=1.1, sample_rate=0.05,
                steps=50, max_grad_norm=1.0, accountant="prv", secure_mode=secure_mode,
                patients_bucket=patients_bucket, ledger_seq=1, ledger_head="ab" * 32)


# ---- bytes on the wire -----------------------------------------------------


def reply_message(content: Any, node_id: int = 7_382_916_514_009_112_345, run_id: int = 4_611_686_018_427):
    """A reply Message as the ClientApp returns it (to a train instruction of a realistic run/node id)."""
    from flwr.app import Message

    from shared import wire_pack

    _task_identity(run_id)
    ins = Message(wire_pack.pack_instruction(round_id=3, adapter=None), dst_node_id=node_id,
                  message_type="train", group_id="3")
    return Message(content, reply_to=ins)


def _task_identity(run_id: int) -> None:
    # What Flower's runtime sets in a ServerApp process; Message() reads it.
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", run_id), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, attr, value)


def serde_bytes(message: Any) -> int:
    """Flower's protobuf serde of the whole Message, content inline."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).ByteSize()


def fleet_bytes(message: Any) -> int:
    """What a SuperNode sends over the Fleet API (grpc-rere) for one reply, protobuf bytes.

    ``PushMessagesRequest`` (message without content + object tree), then one
    ``PushObjectRequest`` per distinct deflated object (Flower pushes each object id
    once: identical chunks, e.g. all-zero arrays, travel once).
    """
    from flwr.app.message import remove_content_from_message  # type: ignore[attr-defined]
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    node = Node(node_id=message.metadata.src_node_id)
    run_id = message.metadata.run_id
    objects = get_all_nested_objects(message)
    head = PushMessagesRequest(node=node, messages_list=[message_to_proto(remove_content_from_message(message))],
                               message_object_trees=[get_object_tree(message)], clientapp_runtime_list=[1.0])
    total = head.ByteSize()
    for object_id, obj in objects.items():
        total += PushObjectRequest(node=node, run_id=run_id, object_id=object_id, object_content=obj.deflate(),
                                   session_id="0" * 32).ByteSize()
    return total


def bytes_plain(shape: str, dtype: str) -> dict[str, Any]:
    spec = adapter_spec(shape, dtype)
    adapter = random_adapter(spec, seed=1)
    raw = sum(a.nbytes for a in adapter.values())
    msg = reply_message(wire_pack.pack_train_reply(adapter, privacy_scalars()))
    params = sum(int(np.prod(s)) for s, _ in spec.values())
    return {"shape": shape, "dtype": dtype, "tensors": len(spec), "params": params,
            "analytic_params": analytic_params(shape), "raw_bytes": raw,
            "serde_bytes": serde_bytes(msg), "fleet_bytes": fleet_bytes(msg),
            "serde_ratio": serde_bytes(msg) / raw, "fleet_ratio": fleet_bytes(msg) / raw}


def bytes_secagg(shape: str, sites: int) -> dict[str, Any]:
    """One in-process SecAgg+ round (real ClientApp + server/secagg.py); Fleet bytes per stage per site."""
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto

    import client.app
    from client.app import app as client_app
    from server import secagg
    from shared.run_config import RunConfig

    _task_identity(1)
    spec = adapter_spec(shape, "float32")
    real_site = client.app.site
    client.app.site = _bench_site(spec)  # the ClientApp's site functions: the stand-in, for this round only
    rc = {"min-sites": 2, "lora.r": SHAPES[shape]["r"], "secagg": True, "secagg-clipping-range": 1.0}
    run = RunConfig.from_flower(rc)
    tmp = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config=rc,
                                 node_config={"site-id": f"site-{k}", "output-dir": str(tmp / f"s{k}")})
                for k in range(sites)}
    per_stage: dict[str, list[int]] = {}

    class Grid:  # the subset of flwr.serverapp.Grid the SecAgg+ workflow uses, serialising both ways
        def get_node_ids(self):
            return list(contexts)

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for msg in messages:
                node = msg.metadata.dst_node_id
                stage = msg.content.config_records[wire_secagg.SECAGG_CONFIGS_KEY]["stage"]
                got = message_from_proto(message_to_proto(msg))
                try:
                    reply = client_app(got, contexts[node])
                except Exception as exc:
                    reply = Message(Error(code=1, reason=type(exc).__name__), reply_to=got)
                per_stage.setdefault(str(stage), []).append(fleet_bytes(reply))
                out.append(message_from_proto(message_to_proto(reply)))
            return out

    t = time.perf_counter()
    try:
        outcome = secagg.train_round(Grid(), run, nodes=sorted(contexts), round_id=1, global_adapter=None)
    finally:
        client.app.site = real_site
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t
    if outcome.adapter is None:
        raise RuntimeError(f"SecAgg+ round did not aggregate: {outcome.replies.to_json()}")
    raw = sum(int(np.prod(s)) * 4 for s, _ in spec.values())  # float32 adapter
    stages = {k: float(np.mean(v)) for k, v in per_stage.items()}
    total = sum(stages.values())
    return {"shape": shape, "sites": sites, "raw_bytes_float32": raw, "stage_bytes": stages,
            "total_bytes": total, "total_ratio": total / raw,
            "masked_ratio": stages.get("collect_masked_vectors", 0.0) / raw, "round_s": seconds}


def _bench_site(spec: AdapterSpec) -> types.ModuleType:
    """Stand-in for client/site.py in the in-process SecAgg+ round: a random adapter of ``spec``."""
    site = types.ModuleType("client.site")
    site.adapter_spec = lambda settings, run: spec
    site.site_train = lambda settings, run, *, global_adapter, round_id: (
        random_adapter(spec, seed=hash(settings.site_id) % 2**31),
        privacy_scalars(secure_mode=run.train.secure_mode))  # the wire checks it against the run
    site.release_update = lambda settings, privacy: None
    return site


# ---- aggregation time ------------------------------------------------------


def aggregation(shape: str, sites: int, norm_bound: float, repeats: int) -> dict[str, Any]:
    from server import strategy

    spec = adapter_spec(shape, "float32")
    reference = random_adapter(spec, seed=0)
    updates = [random_adapter(spec, seed=1 + i) for i in range(sites)]
    weights = strategy.site_weights([10 * (i + 1) for i in range(sites)], scheme="patients")

    def baseline() -> None:
        for name in spec:
            np.mean(np.stack([u[name] for u in updates]), axis=0)

    def timed(fn) -> tuple[float, float]:
        # wall and CPU seconds, best of `repeats` (CPU time is robust to other jobs on a shared box)
        wall = cpu = float("inf")
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        return wall, cpu

    base, base_cpu = timed(baseline)
    rows: dict[str, Any] = {"baseline_numpy_mean_s": base, "baseline_numpy_mean_cpu_s": base_cpu}
    for method in ("fedavg", "trimmed-mean", "median"):
        s, c = timed(lambda m=method: strategy.aggregate(
            updates, weights=weights, reference=reference, method=m, trim_fraction=0.2,
            norm_bound=norm_bound, dtype="float32"))
        rows[method] = {"seconds": s, "ratio": s / base, "cpu_s": c, "cpu_ratio": c / base_cpu}
    params = sum(int(np.prod(s)) for s, _ in spec.values())
    return {"shape": shape, "sites": sites, "params": params, "norm_bound": norm_bound, **rows}


# ---- simulated rounds ------------------------------------------------------


def simulate(sites: int, rounds: int, timeout: float) -> dict[str, Any]:
    """`flwr run` the fake-site bundle on a fresh simulation SuperLink; per-round wall seconds."""
    from tests.e2e.harness import build_app, free_port

    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    port = free_port()
    home = tmp / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        f"options.num-supernodes = {sites}\noptions.backend.client-resources.num-cpus = 1\n")
    for k in range(sites):  # partition i -> i-th sorted dir; the fake site reads k from "site-<k>"
        (tmp / "sim" / f"site-{k:03d}").mkdir(parents=True)
        (tmp / "sim" / f"site-{k:03d}" / "notes.jsonl").write_text("")
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = os.environ | {
        "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FEDSYNTH_SIM_ROOT": str(tmp / "sim"), "FEDSYNTH_COORD_RUN_DIR": str(tmp / "coord"),
        "RAY_TMPDIR": ray_dir, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    app = build_app(tmp, "app")
    log = open(tmp / "superlink.log", "w")  # noqa: SIM115 - closed below
    link = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
         "--port", str(port), "--disable-runtime-dependency-installation"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    marks: dict[str, dict[int, float]] = {"start": {}, "done": {}}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        cfg = (f"num-rounds={rounds} min-sites={sites} timeout.wait-sites={timeout} "
               f"timeout.train={timeout} timeout.evaluate={timeout}")
        t0 = time.monotonic()
        proc = subprocess.Popen([str(bin_dir / "flwr"), "run", str(app), "sim", "--stream", "--run-config", cfg],
                                env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            now = time.monotonic() - t0
            tail = (tail + [line])[-40:]
            if m := re.search(r"fedsynth round (\d+)/\d+ done", line):
                marks["done"][int(m.group(1))] = now
            elif m := re.search(r"fedsynth round (\d+)/\d+: \d+ sites connected", line):
                marks["start"][int(m.group(1))] = now
        proc.wait(timeout=60)
        total = time.monotonic() - t0
        summary = json.loads((tmp / "coord" / "fedsynth" / "consortium-summary.json").read_text())
        # Checkpoint write times: the interval between rounds i and i+1 is one full round cycle
        # (evaluate i, train + aggregate i+1), independent of how the log stream batches lines.
        ckpts = sorted((tmp / "coord" / "fedsynth" / "checkpoints").glob("round-*/adapter_model.safetensors"))
        stamps = [p.stat().st_mtime for p in ckpts]
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(timeout=30)
        except subprocess.TimeoutExpired:
            link.kill()
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
    per_round = [marks["done"][r] - marks["start"][r] for r in sorted(marks["done"]) if r in marks["start"]]
    accepted = [len(r.get("train", {}).get("accepted", [])) for r in summary["rounds"]]
    shutil.rmtree(tmp, ignore_errors=True)
    if summary.get("status") != "completed" or len(per_round) != rounds:
        raise RuntimeError(f"simulation did not complete: {summary.get('status')}\n{''.join(tail)}")
    return {"sites": sites, "rounds": rounds, "site": "TEST-ONLY fake (tests/fake_site.py), no model",
            "round_s": per_round,
            "checkpoint_interval_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "first_round_start_s": marks["start"][1], "flwr_run_total_s": total,
            "accepted_per_round": accepted}


# ---- main ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("bytes", "secagg", "aggregate", "simulate"), action="append",
                    help="run only these parts (repeatable); default: all")
    ap.add_argument("--dtypes", default="float32,float16", help="wire dtypes for the plain bytes table")
    ap.add_argument("--secagg-sites", type=int, default=3, help="sites in the in-process SecAgg+ round")
    ap.add_argument("--secagg-shapes", default="embedded,llama-8b")
    ap.add_argument("--agg-sites", type=int, default=20)
    ap.add_argument("--agg-shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--norm-bound", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=1, help="aggregation timings: best of N")
    ap.add_argument("--sites", type=int, default=5, help="simulated sites (fake site)")
    ap.add_argument("--rounds", type=int, default=2, help="simulated rounds")
    ap.add_argument("--timeout", type=float, default=600.0, help="simulation: wait/train/evaluate timeouts, s")
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)
    parts = set(args.only or ("bytes", "secagg", "aggregate", "simulate"))
    out: dict[str, Any] = {"device": device_name()}
    print(f"device: {out['device']}")
    if "bytes" in parts:
        out["bytes"] = [bytes_plain(s, d) for s in SHAPES for d in args.dtypes.split(",")]
        print(f"\nplain train reply vs raw adapter (target <= {BYTES_TARGET}x)")
        print(f"{'shape':10} {'dtype':8} {'params':>11} {'raw B':>11} {'serde B':>11} {'x':>7} "
              f"{'fleet B':>11} {'x':>7}")
        for r in out["bytes"]:
            if r["params"] != r["analytic_params"]:
                raise RuntimeError(f"PEFT spec has {r['params']} params, dimensions give {r['analytic_params']}")
            print(f"{r['shape']:10} {r['dtype']:8} {r['params']:>11,} {r['raw_bytes']:>11,} "
                  f"{r['serde_bytes']:>11,} {r['serde_ratio']:>7.4f} {r['fleet_bytes']:>11,} {r['fleet_ratio']:>7.4f}")
    if "secagg" in parts:
        out["secagg"] = [bytes_secagg(s, args.secagg_sites) for s in args.secagg_shapes.split(",")]
        print(f"\nSecAgg+ ({args.secagg_sites} sites, in-process): Fleet bytes one site sends per stage "
              "vs raw float32 adapter")
        for r in out["secagg"]:
            stages = ", ".join(f"{k} {v:,.0f}" for k, v in r["stage_bytes"].items())
            print(f"{r['shape']:10} raw {r['raw_bytes_float32']:,}: {stages}; total {r['total_bytes']:,.0f} "
                  f"= {r['total_ratio']:.3f}x (masked vector {r['masked_ratio']:.3f}x); round {r['round_s']:.1f} s")
    if "aggregate" in parts:
        r = aggregation(args.agg_shape, args.agg_sites, args.norm_bound, args.repeats)
        out["aggregate"] = r
        print(f"\naggregate {r['sites']} sites x {r['params']:,} params ({r['shape']}), norm bound "
              f"{r['norm_bound']}: baseline numpy mean {r['baseline_numpy_mean_s']:.2f} s wall, "
              f"{r['baseline_numpy_mean_cpu_s']:.2f} s CPU")
        for m in ("fedavg", "trimmed-mean", "median"):
            print(f"  {m:13} {r[m]['seconds']:7.2f} s wall {r[m]['ratio']:6.2f}x   "
                  f"{r[m]['cpu_s']:7.2f} s CPU {r[m]['cpu_ratio']:6.2f}x")
    if "simulate" in parts:
        r = simulate(args.sites, args.rounds, args.timeout)
        out["simulate"] = r
        print(f"\nsimulation, {r['sites']} sites, {r['site']}: first round started at "
              f"{r['first_round_start_s']:.1f} s; per round " + ", ".join(f"{s:.1f}" for s in r["round_s"])
              + " s (log lines); checkpoint to checkpoint "
              + ", ".join(f"{s:.1f}" for s in r["checkpoint_interval_s"]) + f" s; flwr run total {r['flwr_run_total_s']:.1f} s; accepted {r['accepted_per_round']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
