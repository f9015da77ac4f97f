"""Memorization scan: indexed lexical privacy metrics vs all-pairs ROUGE-L, measured in the same run.

M synthetic reports x N private notes of ~250 tokens from a seeded Zipfian word
model; 5% of reports copy a 20-60 token passage from a random private note and
1% are verbatim copies. For each N it times ``lexical_privacy`` (index build +
n-gram overlap 8/13 + exact LCS + ROUGE-L on retrieved candidates) and prints
seconds, seconds per private note (flat = linear growth) and the speedup over
all-pairs ROUGE-L extrapolated from pairs timed in this run, both with the
naive DP (``rouge_l``) and with the same bit-parallel kernel the scan uses.

    .venv/bin/python bench/memorization_scan.py                 # N = 10k, 30k, 100k, M = 10k
    .venv/bin/python bench/memorization_scan.py --sizes 1000,3000 --m 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.evaluate.ngram_index import PrivateIndex  # noqa: E402
from client.evaluate.privacy import lexical_privacy, rouge_l, rouge_l_pairs  # noqa: E402
from client.evaluate.tokens import word_tokens  # noqa: E402


def make_corpus(n: int, rng: np.random.Generator, words: np.ndarray, p: np.ndarray) -> list[str]:
    lengths = rng.integers(200, 301, size=n)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    cuts = np.cumsum(lengths)[:-1]
    return [" ".join(words[chunk]) for chunk in np.split(ids, cuts)]


def make_synthetic(
    m: int, private: list[str], rng: np.random.Generator, words: np.ndarray, p: np.ndarray
) -> list[str]:
    out = make_corpus(m, rng, words, p)
    for i in rng.choice(m, size=m // 20, replace=False):  # 5% copy a passage
        src = private[int(rng.integers(len(private)))].split()
        span = int(rng.integers(20, 61))
        start = int(rng.integers(0, len(src) - span))
        own = out[i].split()
        cut = int(rng.integers(0, len(own)))
        out[i] = " ".join(own[:cut] + src[start : start + span] + own[cut:])
    for i in rng.choice(m, size=m // 100, replace=False):  # 1% verbatim copies
        out[i] = private[int(rng.integers(len(private)))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10000,30000,100000", help="private corpus sizes N")
    ap.add_argument("--m", type=int, default=10_000, help="synthetic reports M")
    ap.add_argument("--vocab", type=int, default=30_000)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    words = np.array([f"w{np.base_repr(i, 36).lower()}" for i in range(args.vocab)])
    p = 1.0 / np.arange(1, args.vocab + 1) ** args.zipf
    p /= p.sum()
    print(
        f"device: CPU, {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"load avg {os.getloadavg()[0]:.1f} (shared machine), numpy {np.__version__}"
    )
    print(
        f"M = {args.m} synthetic reports; notes 200-300 tokens; Zipf({args.zipf}) over {args.vocab} words"
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        private = make_corpus(n, rng, words, p)
        synthetic = make_synthetic(args.m, private, rng, words, p)
        t0, c0 = time.perf_counter(), time.process_time()
        index = PrivateIndex(private, seed=args.seed)
        t1, index_cpu = time.perf_counter(), time.process_time() - c0
        res = lexical_privacy(synthetic, private, index=index)
        t2, cpu = time.perf_counter(), time.process_time() - c0
        # baselines, timed now on a subsample of pairs of the same corpora
        pairs = 20
        a_tok = [word_tokens(synthetic[i]) for i in range(pairs)]
        b_tok = [word_tokens(private[i]) for i in range(pairs)]
        tb = time.perf_counter()
        for a, b in zip(a_tok, b_tok, strict=True):
            rouge_l(a, b)
        naive_pair = (time.perf_counter() - tb) / pairs
        sc = index.scan(synthetic[:1000], candidates=1)
        k = 20_000
        ai, bi = rng.integers(0, sc.synthetic.n_docs, k), rng.integers(0, n, k)
        tb = time.perf_counter()
        rouge_l_pairs(sc.synthetic, ai, index.corpus, bi)
        kernel_pair = (time.perf_counter() - tb) / k
        total = t2 - t0
        allpairs_naive, allpairs_kernel = naive_pair * args.m * n, kernel_pair * args.m * n
        rows.append((n, total, cpu, index_cpu, allpairs_naive, allpairs_kernel))
        print(
            f"N={n:>7}: {total:7.1f} s wall, {cpu:.1f} s CPU (index {t1 - t0:.1f} s wall / {index_cpu:.1f} s CPU "
            f"= {1e3 * index_cpu / n:.3f} ms CPU per note; scan+ROUGE {t2 - t1:.1f} s wall), "
            f"{1e3 * total / n:.3f} ms per private note | all-pairs ROUGE-L extrapolated: "
            f"naive DP {allpairs_naive / 3600:,.0f} h ({1e3 * naive_pair:.1f} ms/pair) -> speedup {allpairs_naive / total:,.0f}x; "
            f"bit-parallel {allpairs_kernel / 3600:,.1f} h ({1e6 * kernel_pair:.1f} us/pair) -> speedup {allpairs_kernel / total:,.0f}x | "
            f"verbatim rate {res.verbatim_13.mean():.3f}, lcs max {res.lcs_tokens.max()}, rouge p95 {np.percentile(res.rouge_l_max, 95):.2f}",
            flush=True,
        )
    print(
        "\n(single-threaded numpy: CPU seconds ~ wall seconds on an idle core; speedups use wall time)"
    )
    print(
        "| N private | M synthetic | wall s | CPU s | index CPU ms / note | marginal CPU ms / note | all-pairs naive DP (extrap.) | speedup | all-pairs bit-parallel (extrap.) | speedup |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    prev = None
    for n, total, cpu, index_cpu, naive, kern in rows:
        marginal = f"{1e3 * (cpu - prev[1]) / (n - prev[0]):.3f}" if prev and n > prev[0] else "—"
        prev = (n, cpu)
        print(
            f"| {n:,} | {args.m:,} | {total:.1f} | {cpu:.1f} | {1e3 * index_cpu / n:.3f} | {marginal} | {naive / 3600:,.0f} h | {naive / total:,.0f}x | {kern / 3600:,.1f} h | {kern / total:,.0f}x |"
        )


if __name__ == "__main__":
    main()
