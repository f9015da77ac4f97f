"""Generation throughput: ms per decode step and tokens/s, plain HF generate vs the fast path, same run.

Per batch size B, B random prompts of ``--prompt-len`` tokens each generate
exactly ``--new-tokens`` tokens (no EOS), sampling with temperature 0.8 and
top-p 0.95 (top-k off) in both paths:

- ``hf``   : ``model.generate(do_sample=True)``, dynamic cache: the baseline;
- ``fast`` : :func:`client.fast_generate.generate_token_ids` (static ring
  cache, decode step compiled with ``mode="reduce-overhead"`` on CUDA,
  top-k-prefiltered exact top-p).

``ms/step`` is wall time of the whole call (prefill included) divided by the
new tokens; ``tok/s`` = B x new tokens / wall time. Each path runs once
untimed first (CUDA start-up, compilation). The **roofline** is the time to
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


def run_batch(model, config, batch: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import torch

    from client.fast_generate import generate_token_ids

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=gen)
    n = args.new_tokens

    def hf() -> None:
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts.to(device),
                attention_mask=torch.ones_like(prompts, device=device),
                do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
        assert out.shape[1] == args.prompt_len + n

    stats: dict[str, int] = {}

    def fast() -> None:
        out = generate_token_ids(
            model, prompts.tolist(), max_new_tokens=n, temperature=TEMPERATURE, top_p=TOP_P,
            batch_size=batch, seed=0, stats=stats, compile=args.compile,
        )  # fmt: skip
        assert all(len(x) == n for x in out)

    results: dict[str, dict[str, float]] = {}
    for mode, fn in (("hf", hf), ("fast", fast)):
        if mode not in args.modes:
            continue
        try:
            warm = time_call(fn, device)  # start-up and (fast, CUDA) compilation
            stats.clear()
            seconds = time_call(fn, device)
        except Exception as exc:  # report, keep the other results
            results[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[mode] = {
            "ms_per_step": 1000 * seconds / n,
            "tokens_per_s": batch * n / seconds,
            "first_call_s": warm,
        }
        if mode == "fast":
            results[mode]["full_sort_share"] = stats.get("full_sort_rows", 0) / (batch * n)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batches", default="1,16,64,256", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--logit-std", type=float, default=4.0)
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        default=None,
        help="fast path: never compile the decode step (default: compile on CUDA only)",
    )
    parser.add_argument("--modes", default="hf,fast", help="comma list of hf, fast")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m in ("hf", "fast")]
    batches = [int(b) for b in args.batches.split(",") if b]

    import torch

    warnings.filterwarnings("ignore")
    device_text = device_name(args.device, args.threads)
    model, config = build_model(args)
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
        f"{'batch':>5} {'mode':<5} {'ms/step':>9} {'x hf':>6} {'x roof':>7} {'tok/s':>10} {'full-sort':>9}"
    )
    report: dict[str, dict] = {}
    failed = False
    for batch in batches:
        results = run_batch(model, config, batch, args)
        base = results.get("hf", {}).get("ms_per_step")
        for mode, r in results.items():
            if "error" in r:
                failed = True
                print(f"{batch:>5} {mode:<5} failed: {r['error']}")
                continue
            r["ratio_vs_hf"] = r["ms_per_step"] / base if base else float("nan")
            r["ratio_vs_roofline"] = r["ms_per_step"] / roofline_ms
            share = f"{r['full_sort_share']:.1%}" if "full_sort_share" in r else ""
            print(
                f"{batch:>5} {mode:<5} {r['ms_per_step']:>9.3f} {r['ratio_vs_hf']:>5.2f}x "
                f"{r['ratio_vs_roofline']:>6.1f}x {r['tokens_per_s']:>10.1f} {share:>9}"
            )
        report[str(batch)] = results
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": device_text,
                    "shape": args.shape,
                    "dtype": str(next(model.parameters()).dtype),
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "temperature": TEMPERATURE,
                    "top_p": TOP_P,
                    "logit_std": args.logit_std,
                    "weight_bytes": weight_bytes,
                    "copy_bandwidth_bytes_per_s": bandwidth,
                    "roofline_ms_per_step": roofline_ms,
                    "results": report,
                },
                indent=2,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
