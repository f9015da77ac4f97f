"""Evaluation statistics over private notes that may leave a site: per-patient, bounded, DP-noised.

Why: a metric over private notes is a query on the notes. A coordinator that
chooses the adapter can make every synthetic report say the same thing (a
guessed record number, a guessed sentence) and read the answer off a
max-type or per-report metric: one patient decides the value. So nothing
computed over private notes leaves in the clear. What leaves is one Gaussian
mechanism per evaluation, charged to the site's privacy ledger like a
training round (``client/evaluate/eval_policy.py`` charges it before anything
is computed).

The released vector. Each private patient p of group g (``train`` or
``heldout``, as split by :func:`client.patient_split.split_by_patient`) contributes a
row of numbers in [0, 1] that depend only on p's own notes, the synthetic
reports and the models — never on another patient:

- ``covered``: 1 if some synthetic report was generated for one of the
  primary codes of p's notes ("p's codes"), else 0 (and every score below is 0);
- ``verbatim_13_rate`` / ``verbatim_26_rate``: 1 if some report of p's codes
  contains a 13- (26-) token span that occurs verbatim in one of p's notes;
- ``phi_echo_rate``: 1 if some report of p's codes contains one of p's known
  identifiers (``identifiers`` of p's notes; matching as
  :func:`client.evaluate.privacy.phi_echo`);
- ``centroid_cosine_mean`` (texts masked by :mod:`client.evaluate.masking`): mean over p's notes with a reported code of
  (1 + cos(note, centroid of the synthetic reports of that code)) / 2;
- ``loss_drop_mean`` (when the model is scored): mean over p's notes of
  clip(1/2 + (base loss − adapter loss) / (2·LOSS_SCALE_NATS), 0, 1), the
  calibrated membership signal of one patient.

Only reports of p's own codes are read for p. Reports of one code are drawn
from the adapter and that code alone, so adding or removing a patient changes
no other patient's row (in distribution, and exactly under the coupling that
draws each code's reports from the same randomness).

The sums of the rows over each group, (covered count, score sums), are
released with Gaussian noise of standard deviation σ·Δ on every coordinate,
σ = the site's ``eval_noise_multiplier``. Δ is the L2 sensitivity of the whole
vector (both groups) to adding or removing one patient q (m = number of
scores). Patients are ranked by a keyed hash and the first round(fraction·n)
are held out, so adding q changes that count by 0 or 1 and moves at most one
other patient p across the boundary: either one group gains q's row (no move),
or one group gains q and loses p while the other gains p. Rows lie in
[0, 1]^(m+1), so per coordinate (q−p)² + p² ≤ 2 and Δ² ≤ 2(m+1):
Δ = √(2(m+1)). The Gaussian mechanism with noise
σ·Δ is exactly one step of the sampled Gaussian mechanism with noise
multiplier σ and sample rate 1, which the ledger's accountant composes with
training. Rates (noisy sum / noisy count) and the rounding to a few
significant digits are post-processing.

Max/min statistics over notes (longest copied span, highest ROUGE-L, highest
canary exposure) have no per-patient bound worth the name: they never leave
the site; they stay in the local evaluation report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from client.evaluate.privacy import MIN_IDENTIFIER_CHARS, _norm, phi_echo
from client.evaluate.summary import Cell
from client.evaluate.tokens import word_tokens
from client.notes import Note
from shared.errors import ConfigError, InputError, Problem

GROUPS = ("train", "heldout")
LEXICAL_STATS = ("verbatim_13_rate", "verbatim_26_rate", "phi_echo_rate", "centroid_cosine_mean")
LOSS_STAT = "loss_drop_mean"
VERBATIM_LENGTHS = {"verbatim_13_rate": 13, "verbatim_26_rate": 26}
# A loss drop of this many nats/token (base minus adapter) saturates a patient's loss score.
LOSS_SCALE_NATS = 1.0
# Δ² = SPLIT_SHIFT_FACTOR · (m + 1): the new patient's row plus one patient moving between groups.
SPLIT_SHIFT_FACTOR = 2


def wire_names(stats: Sequence[str]) -> list[str]:
    """The metric names a release with these ``stats`` puts on the wire (both groups)."""
    return [f"dp.{g}.{name}" for g in GROUPS for name in ("patients", *stats)]


def sensitivity(n_stats: int) -> float:
    """L2 sensitivity Δ of the released vector (both groups) to adding/removing one patient."""
    if isinstance(n_stats, bool) or not isinstance(n_stats, int) or n_stats < 0:
        raise ConfigError(f"n_stats must be a non-negative integer, got {n_stats!r}")
    return math.sqrt(SPLIT_SHIFT_FACTOR * (n_stats + 1))


@dataclass(frozen=True)
class PatientTable:
    """Per-patient rows of one group (site-only; never leaves).

    ``covered[i]`` ∈ {0, 1}; ``scores[i, j]`` ∈ [0, 1] is statistic ``stats[j]`` of
    patient ``patients[i]`` (0 when not covered).
    """

    group: str
    stats: tuple[str, ...]
    patients: tuple[str, ...]
    covered: np.ndarray
    scores: np.ndarray

    def sums(self) -> np.ndarray:
        """(covered count, score sums...) — the group's part of the exact, un-noised vector."""
        return np.concatenate([[self.covered.sum()], self.scores.sum(axis=0)]).astype(np.float64)


def _grams(tokens: Sequence[str], k: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}


def patient_table(
    group: str,
    notes: Sequence[Note],
    *,
    report_codes: Sequence[str],
    report_texts: Sequence[str],
    note_emb: np.ndarray,
    report_emb: np.ndarray,
    loss_gain: np.ndarray | None = None,
) -> PatientTable:
    """One row per distinct patient of ``notes`` (see the module docstring for each score).

    ``note_emb``/``report_emb``: unit-length embeddings aligned with ``notes`` /
    the reports. ``loss_gain``: per note, base-model loss minus adapter loss in
    nats/token (None: no loss score). Raises :class:`InputError` on misaligned inputs.
    """
    problems = []
    if group not in GROUPS:
        problems.append(Problem("group", f"must be one of {GROUPS}, got {group!r}"))
    if len(report_codes) != len(report_texts) or len(report_emb) != len(report_texts):
        problems.append(Problem("reports", "codes, texts and embeddings differ in length"))
    if len(note_emb) != len(notes):
        problems.append(Problem("note_emb", f"{len(note_emb)} rows for {len(notes)} notes"))
    if loss_gain is not None and (len(loss_gain) != len(notes) or not np.isfinite(loss_gain).all()):
        problems.append(Problem("loss_gain", "needs one finite value per note"))
    if problems:
        raise InputError("cannot score patients", problems)
    stats = LEXICAL_STATS + ((LOSS_STAT,) if loss_gain is not None else ())
    reported = set(report_codes)

    # synthetic k-gram -> codes of the reports containing it; identifier -> codes echoing it
    gram_codes: dict[int, dict[tuple[str, ...], set[str]]] = {k: {} for k in VERBATIM_LENGTHS.values()}
    for code, text in zip(report_codes, report_texts, strict=True):
        toks = word_tokens(text)
        for k, table in gram_codes.items():
            for gram in _grams(toks, k):
                table.setdefault(gram, set()).add(code)
    idents = sorted({i for n in notes for i in n.identifiers if len(_norm(i)) >= MIN_IDENTIFIER_CHARS})
    echoed: dict[str, set[str]] = {}
    for code, found in zip(report_codes, phi_echo(list(report_texts), idents), strict=True):
        for ident in found:
            echoed.setdefault(_norm(ident), set()).add(code)
    centroids: dict[str, np.ndarray] = {}
    for code in reported:
        c = np.asarray(report_emb, dtype=np.float64)[[i for i, x in enumerate(report_codes) if x == code]].mean(0)
        centroids[code] = c / max(float(np.linalg.norm(c)), 1e-12)

    by_patient: dict[str, list[int]] = {}
    for i, n in enumerate(notes):
        by_patient.setdefault(n.patient_id, []).append(i)
    patients = tuple(sorted(by_patient))
    covered = np.zeros(len(patients))
    scores = np.zeros((len(patients), len(stats)))
    emb = np.asarray(note_emb, dtype=np.float64)
    for row, pid in enumerate(patients):
        idx = by_patient[pid]
        codes = {notes[i].primary_code for i in idx} & reported
        if not codes:
            continue  # no report was generated for this patient's codes: contributes nothing
        covered[row] = 1.0
        s: dict[str, float] = {}
        for name, k in VERBATIM_LENGTHS.items():
            table = gram_codes[k]
            s[name] = float(any(
                not codes.isdisjoint(table.get(g, ()))
                for i in idx for g in _grams(word_tokens(notes[i].text), k)
            ))
        mine = {_norm(x) for i in idx for x in notes[i].identifiers}
        s["phi_echo_rate"] = float(any(not codes.isdisjoint(echoed.get(x, ())) for x in mine))
        cos = [
            float(emb[i] @ centroids[notes[i].primary_code]) / max(float(np.linalg.norm(emb[i])), 1e-12)
            for i in idx if notes[i].primary_code in reported
        ]
        s["centroid_cosine_mean"] = float(np.mean([(1.0 + c) / 2.0 for c in cos]))
        if loss_gain is not None:
            s[LOSS_STAT] = float(np.mean(0.5 + np.asarray(loss_gain)[idx] / (2 * LOSS_SCALE_NATS)))
        scores[row] = np.clip([s[name] for name in stats], 0.0, 1.0)  # the per-patient bound
    return PatientTable(group, stats, patients, covered, scores)


def standard_normal(n: int) -> np.ndarray:
    """``n`` independent N(0, 1) draws from a fresh ChaCha20 keystream keyed from ``os.urandom``.

    No seed, setting or run config reaches this: DP noise must be unpredictable
    to whoever chose the inputs. The same source as training's noise
    (:mod:`client.dp.noise`, ``chacha20-gaussian``): Box–Muller on 53-bit uniforms,
    then Opacus' floating-point-attack mitigation (one draw thrown away, four
    summed and halved).
    """
    from client.dp.noise import _KeyStream, box_muller, mitigated, uniforms

    draws = 1 + 4 * n
    words = _KeyStream().words(draws + (draws % 2))
    z = box_muller(uniforms(words))
    return mitigated(z, n, std=1.0).numpy()


@dataclass(frozen=True)
class DPRelease:
    """The noisy per-group vectors of one evaluation: the only form private-note metrics leave in.

    ``noisy[g]`` = (covered count, score sums...) of group g plus N(0, (σ·Δ)²) per
    coordinate. ``noise_multiplier`` σ and ``sensitivity`` Δ are public (docs).
    """

    stats: tuple[str, ...]
    noisy: dict[str, np.ndarray]
    noise_multiplier: float
    sensitivity: float

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate (patients)."""
        return self.noise_multiplier * self.sensitivity

    def cells(self) -> dict[str, Cell]:
        """Wire cells: noisy patient counts and rates (noisy sum / noisy count, clipped to [0, 1]).

        A cell's ``n`` is the group's noisy patient count, so ``k_min`` suppression
        counts patients and is itself post-processing of the DP output.
        """
        out: dict[str, Cell] = {}
        for g in GROUPS:
            vec = self.noisy[g]
            count = max(0, int(round(float(vec[0]))))
            out[f"dp.{g}.patients"] = Cell(float(count), count)
            for j, name in enumerate(self.stats):
                rate = float(np.clip(vec[j + 1] / max(float(vec[0]), 1.0), 0.0, 1.0))
                out[f"dp.{g}.{name}"] = Cell(rate, count)
        return out


def gaussian_release(tables: Mapping[str, PatientTable], *, noise_multiplier: float) -> DPRelease:
    """Add N(0, (σ·Δ)²) to every coordinate of both groups' sums (one Gaussian mechanism).

    The caller must have charged (σ, q=1, steps=1) to the ledger first
    (:func:`client.evaluate.eval_policy.charge_evaluation`).
    """
    problems = []
    if set(tables) != set(GROUPS):
        problems.append(Problem("tables", f"need exactly the groups {GROUPS}, got {sorted(tables)}"))
    elif len({tables[g].stats for g in GROUPS}) != 1:
        problems.append(Problem("tables", "groups were scored with different statistics"))
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        math.isfinite(noise_multiplier) and noise_multiplier > 0
    ):
        problems.append(Problem("noise_multiplier", f"must be a finite number > 0, got {noise_multiplier!r}"))
    if problems:
        raise ConfigError("cannot release DP metrics", problems)
    stats = tables[GROUPS[0]].stats
    delta_l2 = sensitivity(len(stats))
    std = float(noise_multiplier) * delta_l2
    noise = standard_normal(len(GROUPS) * (len(stats) + 1)) * std
    noisy = {
        g: tables[g].sums() + noise[i * (len(stats) + 1) : (i + 1) * (len(stats) + 1)]
        for i, g in enumerate(GROUPS)
    }
    return DPRelease(stats, noisy, float(noise_multiplier), delta_l2)
