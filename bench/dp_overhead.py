"""DP training overhead: LoRA step time and peak memory with and without Opacus, same run, same batch.

Four modes on the same random-init Llama shape, LoRA r=16 on q/k/v/o, one
fixed batch of random tokens (throughput does not depend on the weights):

- ``none``  : plain LoRA fine-tuning (AdamW), the baseline;
- ``hooks`` : Opacus per-sample gradients via hooks, flat clipping, Gaussian noise;
- ``ghost`` : Opacus ghost clipping (per-sample norms without per-sample gradients,
  two backward passes), Gaussian noise;
- ``bk``    : book-keeping clipping for LoRA only (``client.dp.bookkeeping``): per-sample
  norms and the clipped sum from one forward and one backward pass, hooks on the
  LoRA Linears only, Gaussian noise.

The noise of the DP modes is what a run draws (``--noise``, :mod:`client.dp.noise`):
``chacha20`` (default, ``secure_mode=True``): a ChaCha20 keystream keyed from
``os.urandom``, generated for the next step in a background thread while this one
computes, Box-Muller and Opacus' four-draw mitigation on the device; ``torch``:
an ``os.urandom``-seeded torch generator (``secure_mode=False``); ``opacus``:
Opacus' own draw from a fixed seed (NOT what a run does; for comparison only).
Each DP mode also reports what one step's secure noise costs when NOT overlapped
(keystream on the CPU + transform on the device), i.e. what prefetching hides.
The DP-step target of the GPU issue is ``x none <= 1.10``.

Each mode runs in its own fresh process, one after the other (so peak memory
is per mode), and is reported -- median seconds per step, peak memory -- as a
ratio against the ``none`` baseline of this run. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (total: weights + activations +
optimizer state) and, on CPU, the process's peak RSS above its RSS just before
the first step (what training added on top of the built model).

    .venv/bin/python bench/dp_overhead.py                                  # CPU, tiny Llama
    .venv/bin/python bench/dp_overhead.py --device cuda --shape llama-1b --batch 8 --seq 512
    .venv/bin/python bench/dp_overhead.py --device cuda --shape llama-8b --batch 8 --seq 512 --json out.json
    .venv/bin/python bench/dp_overhead.py --device cuda --shape llama-1b --modes bk --noise opacus
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("none", "hooks", "ghost", "bk")
# Real Llama dimensions; weights are random (throughput does not depend on them).
SHAPES = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8192,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Build the model, take ``warmup`` + ``steps`` steps in ``mode``; return seconds/step and peak MiB."""
    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from client.dp.noise import GaussianNoise, _KeyStream, box_muller, uniforms, use_noise
    from client.model import add_lora

    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = LlamaConfig(max_position_embeddings=max(2048, args.seq), **SHAPES[args.shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:  # build on the device: no CPU copy of an 8B model
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    model = add_lora(model, r=16, alpha=32, targets=LORA_TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    total_steps = args.warmup + args.steps

    def noise_for(noisy: list) -> GaussianNoise:
        return GaussianNoise(
            [p.shape for p in noisy], dtypes=[p.dtype for p in noisy], std=1.0, steps=total_steps,
            device=device, secure=args.noise == "chacha20",
        )

    step_model, criterion = model, None
    bk, noise = None, None
    if mode == "bk":
        from client.dp.bookkeeping import LoraBookkeeping, noisy_step

        bk = LoraBookkeeping(model).__enter__()  # hooks stay on for the whole (short) process
        if args.noise == "opacus":  # a stand-in with Opacus' plain draw from a fixed seed
            noise = noise_for(bk.params)
            noise.secure, noise._generator = False, torch.Generator(device=device).manual_seed(0)
        else:
            noise = noise_for(bk.params)
    elif mode != "none":
        engine = PrivacyEngine(accountant="prv")
        # Fixed batches of exactly --batch rows so every mode does the same work;
        # the loader only tells Opacus the (expected) batch size.
        loader = DataLoader(TensorDataset(torch.zeros(args.batch * 4)), batch_size=args.batch)
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="ghost" if mode == "ghost" else "hooks",
        )
        if mode == "ghost":
            step_model, optimizer, criterion, _ = out
        else:
            step_model, optimizer, _ = out
        if args.noise != "opacus":
            noise = noise_for(list(optimizer.params))
            use_noise(optimizer, noise)

    def step() -> None:
        logits = step_model(input_ids=ids).logits[:, :-1]
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        targets = ids[:, 1:].reshape(-1)
        if criterion is not None:  # ghost: Opacus' wrapped loss, per-sequence mean
            loss = criterion(flat_logits, targets, shape=(args.batch, args.seq - 1))
        elif bk is not None:  # bk: per-sequence mean, SUMMED (per-sample grads), clip, noise
            per_row = F.cross_entropy(flat_logits, targets, reduction="none").view(args.batch, -1)
            per_row.mean(1).sum().backward()
            bk.accumulate_clipped(max_grad_norm=1.0)
            noisy_step(
                optimizer,
                bk.params,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                expected_batch_size=args.batch,
                noise=noise,
            )
            return
        else:  # per-sequence mean, then batch mean: the recipe's loss
            loss = (
                F.cross_entropy(flat_logits, targets, reduction="none")
                .view(args.batch, -1)
                .mean(1)
                .mean()
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_mib()
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)  # robust to other processes' bursts on a shared box
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib() - rss_before
    result = {"seconds_per_step": seconds, "peak_mib": peak}
    if noise is not None:
        noise.close()
    if mode != "none":
        # One step's secure noise NOT overlapped: keystream (CPU, one thread) + transform (device).
        words = sum(1 + 4 * p.numel() for p in params)
        words += words % 2
        start = time.perf_counter()
        raw = _KeyStream().words(words, pin=cuda)
        keystream = time.perf_counter() - start
        start = time.perf_counter()
        box_muller(uniforms(raw.to(device, non_blocking=True)))
        sync()
        result.update(noise_keystream_s=keystream, noise_transform_s=time.perf_counter() - start,
                      noise_coordinates=sum(p.numel() for p in params))
    return result


def _child(mode: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    try:
        queue.put(run_mode(mode, args))
    except Exception as exc:  # report, don't hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def device_name(device: str, threads: int = 0) -> str:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cores = len(os.sched_getaffinity(0))
    return f"CPU {platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch default)"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma list; 'none' (the baseline) is always run"
    )
    parser.add_argument(
        "--noise", choices=("chacha20", "torch", "opacus"), default="chacha20",
        help="DP noise of the DP modes (module docstring); chacha20 is what a run draws",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    modes = ["none"] + [m for m in args.modes.split(",") if m in MODES and m != "none"]

    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(mode, args, queue))
        proc.start()
        results[mode] = queue.get()
        proc.join()
        if "error" in results[mode]:
            print(f"{mode}: {results[mode]['error']}", file=sys.stderr)

    base = results["none"]
    memory = (
        "torch.cuda.max_memory_allocated"
        if args.device.startswith("cuda")
        else "peak RSS above pre-step RSS"
    )
    print(f"device: {device_name(args.device, args.threads)}")
    print(
        f"shape {args.shape}, batch {args.batch} x seq {args.seq}, LoRA r=16 on q/k/v/o, "
        f"median of {args.steps} timed steps after {args.warmup} warm-up; memory = {memory}"
    )
    print(f"DP noise: {args.noise}" + (" (secure; prefetched, overlapping compute)"
                                       if args.noise == "chacha20" else ""))
    print(f"{'mode':<7} {'s/step':>9} {'x none':>7} {'peak MiB':>10} {'x none':>7}")
    for mode, r in results.items():
        if "error" in r or "error" in base:
            print(f"{mode:<7} {'failed':>9}")
            continue
        r["time_ratio"] = r["seconds_per_step"] / base["seconds_per_step"]
        r["memory_ratio"] = (
            r["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
        )
        print(
            f"{mode:<7} {r['seconds_per_step']:>9.4f} {r['time_ratio']:>6.2f}x "
            f"{r['peak_mib']:>10.1f} {r['memory_ratio']:>6.2f}x"
        )
    secure = [r for m, r in results.items() if m != "none" and "noise_keystream_s" in r]
    if secure:
        r = secure[0]
        print(
            f"secure noise for {r['noise_coordinates']:,} LoRA coordinates, NOT overlapped: "
            f"keystream {r['noise_keystream_s']:.4f} s (CPU) + transform "
            f"{r['noise_transform_s']:.4f} s ({args.device}) per step"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device_name(args.device, args.threads),
                    "shape": args.shape,
                    "batch": args.batch,
                    "seq": args.seq,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "memory": memory,
                    "noise": args.noise,
                    "results": results,
                },
                indent=2,
            )
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
