"""Generation throughput: ms per decode step and tokens/s, plain HF generate vs the fast path, same run.

Per batch size B, B random prompts of ``--prompt-len`` tokens each generate
exactly ``--new-tokens`` tokens (no EOS), sampling with temperature 0.8 and
top-p 0.95 (top-k off) in both paths:

- ``hf``   : ``model.generate(do_sample=True)``, dynamic cache: the baseline;
- ``fast`` : :func:`client.generation.fast.generate_token_ids` (static ring
  cache, decode step compiled with ``mode="reduce-overhead"`` on CUDA,
  top-k-prefiltered exact top-p).

``--eos-mean N`` (EOS mode) times refills instead: ``--prompts-per-slot`` x B
prompts, and token id 2 is EOS. A random-init model would almost never draw
a given token, so the LM head gets a bias buffer (a forward hook, the same for
both paths; zero outside EOS mode) whose EOS entry is calibrated on the
prompts' last-token logits so that EOS holds ``1/N`` of the sampling
distribution (approximately: decode-time hidden states differ from the
prompts', and top-p is not modelled, so rows run longer than ``N``); lengths
are capped at ``--new-tokens`` and the JSON records the actual
``mean_new_tokens`` and ``refill_share``. Rows end at
different steps, so the fast path refills slots mid-run (``refill_share``:
refill prefills per decode step) and plain ``generate`` runs its batches of B
until their longest row ends.

``ms/step`` is wall time of the whole call (prefill included) divided by the
new tokens (EOS mode: by the decode steps for fast, the mean new tokens per
batch for hf); ``tok/s`` = B x new tokens / wall time. Each path runs once
untimed first (CUDA start-up, compilation); ``graphs_compiled_timed`` counts
the graphs dynamo compiled during the timed call (should be 0: the fast path
caches its compiled step, prefill buckets and ring across calls). When the
fast path is compiled, fixed-length mode also reruns it uncompiled with the
same seed (``vs_eager``: first-token agreement, mean common prefix): a
correctness check of the compiled step on the device. The JSON is
rewritten after every result, so a run cut short keeps what it measured. The
**roofline** is the time to
read every weight once per step at a copy bandwidth measured in this run
(``dst.copy_(src)`` of a large tensor; bytes read + written / seconds), i.e. a
lower bound for a memory-bound decode step that ignores the KV cache.

Random-init logits are near-uniform over the vocabulary (std ~1 over 128k
tokens), so every top-p nucleus would hold most of the vocabulary, unlike a
trained LM. The final norm is scaled so the logits have std ``--logit-std``
(default 4: nuclei of tens of tokens), for both paths alike; ``--logit-std 0``
keeps the raw init. ``full_sort_share`` says how often the fast sampler had to
fall back to a full sort.

    .venv/bin/python bench/generate_throughput.py --threads 1 --batches 1,4 --new-tokens 32   # CPU, tiny
    .venv/bin/python bench/generate_throughput.py --device cuda --shape llama-1b --batches 1,16,64,256
    .venv/bin/python bench/generate_throughput.py --device cuda --shape llama-8b --batches 64 --json 8b.json
    .venv/bin/python bench/generate_throughput.py --device cuda --shape llama-1b --batches 64 --eos-mean 0,32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_overhead import SHAPES, device_name  # noqa: E402  (same shapes as the DP bench)

from shared.atomic import write_atomic  # noqa: E402

TEMPERATURE, TOP_P = 0.8, 0.95


def build_model(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(max_position_embeddings=4096, pad_token_id=0, **SHAPES[args.shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:  # build on the device: no CPU copy of an 8B model
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None
    if args.logit_std > 0:
        # Logit std of the random init is about initializer_range * sqrt(hidden) (unit-RMS
        # hidden states times N(0, range^2) weights); rescale the final norm to reach the target.
        raw = config.initializer_range * math.sqrt(config.hidden_size)
        with torch.no_grad():
            model.model.norm.weight.mul_(args.logit_std / raw)
    return model, config


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` counting bytes read + written (median of 5)."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def time_call(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


EOS_ID = 2  # never in the prompts (drawn from ids >= 3)


def install_eos_bias(model) -> None:
    """Give the LM head a zero bias buffer (added by a forward hook) that EOS mode sets.

    A buffer, not a constant: compiled graphs and CUDA graphs read it in place,
    so changing it between runs needs no recompilation.
    """
    import torch

    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    head.register_buffer(
        "eos_bias", torch.zeros(vocab, dtype=head.weight.dtype, device=head.weight.device),
        persistent=False,
    )  # fmt: skip
    head.register_forward_hook(lambda module, args, out: out + module.eos_bias)


def calibrate_eos_bias(model, prompts, share: float) -> float:
    """The EOS logit offset giving EOS ``share`` of the temperature-scaled distribution,
    averaged over the prompts' last positions (bisection; top-p not modelled)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=prompts).logits[:, -1].float() / TEMPERATURE
    lo, hi = -100.0, 100.0
    for _ in range(50):
        mid = (lo + hi) / 2
        shifted = logits.clone()
        shifted[:, EOS_ID] += mid / TEMPERATURE
        p = torch.softmax(shifted, dim=-1)[:, EOS_ID].mean().item()
        lo, hi = (mid, hi) if p < share else (lo, mid)
    return (lo + hi) / 2


def compiled_path(device, args: argparse.Namespace) -> bool:
    return device.type == "cuda" if args.compile is None else bool(args.compile)


def compare_with_eager(model, prompts, compiled: list[list[int]], n: int) -> dict[str, float]:
    """Same prompts and seed through the fast path uncompiled: how alike the tokens are.

    A correctness check of the compiled (CUDA-graph) step on the device: same
    uniforms, same model, so tokens agree until rounding differences between the
    fused and the eager kernels flip a draw; a bug shows as early divergence.
    """
    from client.generation.fast import generate_token_ids

    eager = generate_token_ids(
        model, prompts.tolist(), max_new_tokens=n, temperature=TEMPERATURE, top_p=TOP_P,
        batch_size=len(compiled), seed=0, compile=False,
    )  # fmt: skip

    def common(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    prefixes = [common(a, b) for a, b in zip(compiled, eager, strict=True)]
    return {
        "first_token_agreement": sum(p > 0 for p in prefixes) / len(prefixes),
        "mean_common_prefix": statistics.mean(prefixes),
        "identical_rows": sum(p == n for p in prefixes) / len(prefixes),
    }


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_batch(
    model, config, batch: int, eos_mean: float, args: argparse.Namespace, emit
) -> dict[str, dict]:
    """Time each mode at batch size ``batch``; ``emit(results)`` after each mode."""
    import torch

    from client.generation.fast import generate_token_ids

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch)
    n = args.new_tokens
    eos_mode = eos_mean > 0
    count = batch * (args.prompts_per_slot if eos_mode else 1)
    prompts = torch.randint(3, config.vocab_size, (count, args.prompt_len), generator=gen)
    eos: list[int] | None = None
    bias = getattr(model.get_output_embeddings(), "eos_bias", None)
    if bias is not None:
        bias.zero_()
    if eos_mode:
        eos = [EOS_ID]
        bias[EOS_ID] = calibrate_eos_bias(model, prompts[:16].to(device), 1 / eos_mean)
    eos_set = set(eos or [])
    produced: dict[str, int] = {}

    def new_tokens(rows) -> int:
        # Tokens up to and including the first EOS (what a caller would keep).
        total = 0
        for row in rows:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
            total += cut
        return total

    def hf() -> None:
        total, lengths = 0, []
        for start in range(0, count, batch):
            chunk = prompts[start : start + batch].to(device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=chunk, attention_mask=torch.ones_like(chunk),
                    do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                    max_new_tokens=n, min_new_tokens=0 if eos_mode else n, pad_token_id=0,
                    eos_token_id=eos,
                )  # fmt: skip
            rows = out[:, args.prompt_len :].tolist()
            lengths.append(len(rows[0]))
            total += new_tokens(rows)
        assert eos_mode or total == count * n
        produced.update(tokens=total, steps=sum(lengths))

    stats: dict[str, int] = {}

    def fast() -> None:
        out = generate_token_ids(
            model, prompts.tolist(), max_new_tokens=n, temperature=TEMPERATURE, top_p=TOP_P,
            batch_size=batch, seed=0, stats=stats, compile=args.compile, eos_token_id=eos,
        )  # fmt: skip
        assert eos_mode or all(len(x) == n for x in out)
        produced.update(tokens=sum(len(x) for x in out), steps=stats["steps"], out=out)

    results: dict[str, dict] = {}
    for mode, fn in (("hf", hf), ("fast", fast)):
        if mode not in args.modes:
            continue
        try:
            before = _graphs_compiled()
            warm = time_call(fn, device)  # start-up and (fast, CUDA) compilation
            compiled_warm = _graphs_compiled() - before
            stats.clear()
            before = _graphs_compiled()
            seconds = time_call(fn, device)
            compiled_timed = _graphs_compiled() - before
        except Exception as exc:  # report, keep the other results
            results[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            emit(results)
            continue
        steps = produced["steps"] if eos_mode else n
        results[mode] = {
            "ms_per_step": 1000 * seconds / steps,
            "tokens_per_s": produced["tokens"] / seconds,
            "new_tokens_total": produced["tokens"],
            "mean_new_tokens": produced["tokens"] / count,
            "decode_steps": produced["steps"],
            "first_call_s": warm,
            "graphs_compiled_first": compiled_warm,
            "graphs_compiled_timed": compiled_timed,
        }
        if mode == "fast":
            results[mode]["full_sort_share"] = stats.get("full_sort_rows", 0) / max(
                1, produced["tokens"]
            )
            results[mode]["refill_share"] = max(0, stats["prefills"] - 1) / max(1, stats["steps"])
            results[mode]["refill_rows"] = stats["refill_rows"]
            if compiled_path(device, args) and not eos_mode:
                results[mode]["vs_eager"] = compare_with_eager(model, prompts, produced["out"], n)
        emit(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batches", default="1,16,64,256", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--logit-std", type=float, default=4.0)
    parser.add_argument("--eos-mean", default="0",
                        help="comma list; EOS mode: rows stop after about this many tokens "
                        "(0: off, fixed length); several share one process (and compiled graphs)")
    parser.add_argument("--prompts-per-slot", type=int, default=4,
                        help="EOS mode: prompts per decode slot (so slots are refilled)")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        default=None,
        help="fast path: never compile the decode step (default: compile on CUDA only)",
    )
    parser.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const=True,
        help="fast path: compile the decode step on CPU too (inductor; no CUDA graphs)",
    )
    parser.add_argument("--modes", default="hf,fast", help="comma list of hf, fast")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m in ("hf", "fast")]
    batches = [int(b) for b in args.batches.split(",") if b]
    eos_means = [float(e) for e in args.eos_mean.split(",") if e]

    import torch

    warnings.filterwarnings("ignore")
    device_text = device_name(args.device, args.threads)
    model, config = build_model(args)
    if any(e > 0 for e in eos_means):
        install_eos_bias(model)
    device = next(model.parameters()).device
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    roofline_ms = 1000 * weight_bytes / bandwidth
    print(f"device: {device_text}")
    print(
        f"shape {args.shape} ({weight_bytes / 2**30:.2f} GiB weights, {next(model.parameters()).dtype}), "
        f"prompt {args.prompt_len} + {args.new_tokens} new tokens, T={TEMPERATURE} top-p={TOP_P}; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> weight-read roofline {roofline_ms:.3f} ms/step"
    )
    print(
        f"{'batch':>5} {'mode':<5} {'ms/step':>9} {'x hf':>6} {'x roof':>7} {'tok/s':>10} "
        f"{'full-sort':>9} {'refill':>7} {'jit':>3}"
    )
    report: dict[str, dict] = {}
    header = {
        "device": device_text,
        "shape": args.shape,
        "dtype": str(next(model.parameters()).dtype),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "eos_means": eos_means,
        "prompts_per_slot_eos": args.prompts_per_slot,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "logit_std": args.logit_std,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_ms_per_step": roofline_ms,
    }

    def dump() -> None:  # after every result: a run cut short keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.json, json.dumps({**header, "results": report}, indent=2))

    dump()
    failed = False
    for batch, eos_mean in [(b, e) for b in batches for e in eos_means]:
        key = str(batch) if eos_mean <= 0 else f"{batch}-eos{eos_mean:g}"
        results = run_batch(model, config, batch, eos_mean, args,
                            lambda r, k=key: (report.update({k: r}), dump()))  # fmt: skip
        base = results.get("hf", {}).get("ms_per_step")
        for mode, r in results.items():
            if "error" in r:
                failed = True
                print(f"{key:>5} {mode:<5} failed: {r['error']}")
                continue
            r["ratio_vs_hf"] = r["ms_per_step"] / base if base else float("nan")
            r["ratio_vs_roofline"] = r["ms_per_step"] / roofline_ms
            share = f"{r['full_sort_share']:.1%}" if "full_sort_share" in r else ""
            refill = f"{r['refill_share']:.1%}" if "refill_share" in r else ""
            print(
                f"{key:>5} {mode:<5} {r['ms_per_step']:>9.3f} {r['ratio_vs_hf']:>5.2f}x "
                f"{r['ratio_vs_roofline']:>6.1f}x {r['tokens_per_s']:>10.1f} {share:>9} {refill:>7}"
                f" {r['graphs_compiled_timed']:>3}"
            )
        report[key] = results
        dump()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
