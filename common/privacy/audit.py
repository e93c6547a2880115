"""Empirical privacy: the one-run canary audit's statistics (Steinke, Nasr and Jagielski 2023).

The audit plants m canary *slots*. Slot i holds a pair of candidate records (a_i, b_i); a secret fair coin
S_i in {+1, -1} puts a_i (or b_i) into a site's training data and leaves the other out. Flipping one coin
replaces one training record by another of the same site, so the datasets of two coin vectors that differ
in one place are neighbours under the certificate's replace-one relation and the trained model is
(eps, delta)-DP with respect to every coin. The dataset size never depends on the coins (one record per
slot either way), so the sample rate and the published N stay functions of the public plan.

After training, an attacker guesses T_i in {+1, -1, 0 (abstain)} from the model and the public candidates.
For an (eps, delta)-DP mechanism the number of correct guesses W among r guesses satisfies (their
Theorem 3.1 / Algorithm 2 for delta > 0)

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i,

with q = e^eps / (1 + e^eps), the accuracy of eps-randomized response. The empirical lower bound is the
largest eps that this p-value rejects at the chosen confidence: a mechanism that really were eps-DP would
have produced this many correct guesses with probability below 1 - confidence.

Guesses abstain on the slots the attacker is least sure of. How many to guess is fixed in advance by the
public plan (`guess_fractions`); reporting the best of several fractions pays a Bonferroni factor, so
the confidence is honest for the maximum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def p_value(slots: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of >= `correct` right guesses out of `guesses` under an (epsilon, delta)-DP mechanism."""
    if not 0 <= correct <= guesses <= slots:
        raise ValueError(f"need 0 <= correct <= guesses <= slots, got {correct}, {guesses}, {slots}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    # P[correct - i <= Bin < correct] for i = 1..correct, divided by i: the delta term's worst spread.
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * slots * delta * alpha)


def epsilon_lower_bound(slots: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon rejected at `confidence` by `correct` of `guesses` (0 when nothing is rejected)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(slots, guesses, correct, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(slots, guesses, correct, high, delta) < beta:
        high *= 2.0
        if high > 1e3:  # perfect guesses with delta = 0 reject every epsilon
            return math.inf
    for _ in range(50):
        middle = (low + high) / 2
        if p_value(slots, guesses, correct, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


def guess_counts(slot_scores: np.ndarray, coins: np.ndarray, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """(guesses, correct) for each fraction: guess sign(score) on the most confident share of the slots.

    slot_scores: [m] evidence that candidate a (coin +1) was trained on; coins: [m] the secret truth in {+1, -1}.
    """
    scores = np.asarray(slot_scores, dtype=np.float64)
    truth = np.asarray(coins)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"slot scores and coins must be equal-length vectors, got {scores.shape} and {truth.shape}")
    if not np.isin(truth, (-1, 1)).all():
        raise ValueError("coins must be +1 or -1")
    if not np.isfinite(scores).all():
        raise ValueError("slot scores contain NaN or inf")
    order = np.argsort(-np.abs(scores), kind="stable")
    out = []
    for fraction in fractions:
        k = guesses_for(len(scores), fraction)
        chosen = order[:k]
        guessed = np.sign(scores[chosen])
        out.append((int(np.count_nonzero(guessed)), int(np.sum(guessed == truth[chosen]))))
    return out


def guesses_for(slots: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"guess fractions must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * slots))) if slots else 0


@dataclass(frozen=True)
class AuditBound:
    slots: int
    guesses: int
    correct: int
    guess_fraction: float
    epsilon_lower_bound: float
    confidence: float
    delta: float
    fractions_tried: int  # Bonferroni: each fraction was tested at 1 - (1 - confidence) / fractions_tried

    def to_json(self) -> dict:
        return asdict(self)


def best_bound(slots: int, counts: list[tuple[int, int]], fractions: tuple[float, ...], delta: float,
               confidence: float = 0.95) -> AuditBound:
    """The largest lower bound over the planned guess fractions, Bonferroni-corrected to `confidence`."""
    if len(counts) != len(fractions) or not fractions:
        raise ValueError(f"one (guesses, correct) pair per fraction: {len(counts)} counts for {len(fractions)} fractions")
    per_test = 1.0 - (1.0 - confidence) / len(fractions)
    bounds = [epsilon_lower_bound(slots, r, v, delta, per_test) for r, v in counts]
    best = int(np.argmax(bounds))
    return AuditBound(slots=slots, guesses=counts[best][0], correct=counts[best][1], guess_fraction=fractions[best],
                      epsilon_lower_bound=float(bounds[best]), confidence=confidence, delta=delta,
                      fractions_tried=len(fractions))


def audit_report(site_summaries: dict[str, dict[str, float]], fractions: tuple[float, ...], delta: float,
                 confidence: float, certified_epsilon: float | None) -> dict:
    """Pool the sites' (guesses, correct) per fraction into one bound; keep each site's attack figures.

    The pooled guesses are one guessing rule over all slots (each site's rule reads the final weights and
    its public candidates), so the theorem applies to the sums. certified_epsilon: the release's, None for
    a non-private run.
    """
    if not site_summaries:
        raise ValueError("no site returned an audit summary")
    slots = int(sum(s["audit-slots"] for s in site_summaries.values()))
    counts = [(int(sum(s[f"audit-guesses-{j}"] for s in site_summaries.values())),
               int(sum(s[f"audit-correct-{j}"] for s in site_summaries.values()))) for j in range(len(fractions))]
    bound = best_bound(slots, counts, fractions, delta, confidence)
    weights = {name: s["audit-slots"] / slots for name, s in site_summaries.items()}
    attack = {key: float(sum(weights[n] * s[f"audit-{key}"] for n, s in site_summaries.items()))
              for key in ("mia_auc", "mia_tpr_at_0p1pct_fpr", "mia_tpr_at_1pct_fpr")}
    return {
        "certified_epsilon": certified_epsilon,
        "empirical_epsilon_lower_bound": bound.epsilon_lower_bound,
        "bound": bound.to_json(),
        "counts_per_fraction": [{"fraction": f, "guesses": r, "correct": v} for f, (r, v) in zip(fractions, counts)],
        "attack": attack,  # slot-weighted mean over sites: members vs held-out candidates
        "sites": {name: {"slots": int(s["audit-slots"]), **{k: float(s[f"audit-{k}"]) for k in attack}}
                  for name, s in sorted(site_summaries.items())},
        "method": "one-run canary audit (Steinke, Nasr, Jagielski 2023), paired candidates under replace-one, "
                  "score: denoising-loss reduction from the initial to the final weights",
    }


def audit_table(report: dict) -> str:
    """The audit as the table `fedecg privacy audit` prints."""
    certified = report["certified_epsilon"]
    bound = report["bound"]
    rows = [
        ("certified epsilon", "not private (no guarantee)" if certified is None else f"{certified:.3g}"),
        (f"empirical epsilon lower bound ({bound['confidence']:.0%} conf., delta {bound['delta']:g})",
         f"{report['empirical_epsilon_lower_bound']:.3g}"),
        ("canary slots / guesses / correct", f"{bound['slots']} / {bound['guesses']} / {bound['correct']}"),
        ("attack AUC (members vs held-out canaries)", f"{report['attack']['mia_auc']:.3f}"),
        ("attack TPR at 0.1% FPR", f"{report['attack']['mia_tpr_at_0p1pct_fpr']:.3f}"),
        ("attack TPR at 1% FPR", f"{report['attack']['mia_tpr_at_1pct_fpr']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
