"""DP-SGD accounting: epsilon of a composition, noise calibration, and a site's budget for one run.

The headline relation is **replace-one**: neighbouring datasets have the same size and differ in one
record. The certificate publishes each site's record count N, and the sampling rate q = 1/ceil(N/B) is a
function of it, so add/remove (which would let N change) is not the relation the release can claim.
Epsilon is computed with dp-accounting's PLD accountant, which supports both relations; the
add/remove figure is reported beside it and cross-checked against Opacus' PRV accountant in the tests.

A history is a list of (noise_multiplier, sample_rate, steps) entries, all Poisson-subsampled Gaussian.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

History = list[tuple[float, float, int]]
RELATIONS = {
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}
HEADLINE_RELATION = "replace_one"
# PLD discretization: coarser is faster and still an upper bound (pessimistic by ~1e-5 in epsilon at 1e-3).
_PLD_INTERVAL = 1e-3
# Calibration stops once the planned steps spend between target - tolerance and target.
CALIBRATION_TOLERANCE = 0.01


def _event(history: History) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(sigma))), int(n)
            )
            for sigma, q, n in history
            if n > 0
        ]
    )


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, relation: str) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(RELATIONS[relation], value_discretization_interval=_PLD_INTERVAL)
    accountant.compose(_event(list(history)))
    return float(accountant.get_epsilon(delta))


def epsilon_of(history: History, delta: float, relation: str = HEADLINE_RELATION) -> float:
    """Epsilon of the composition of every (sigma, q, steps) entry in `history` at `delta`."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; expected one of {sorted(RELATIONS)}")
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not entries:
        return 0.0
    for sigma, q, _ in entries:
        if sigma <= 0 or not 0 < q <= 1:
            raise ValueError(f"history entry (sigma={sigma}, q={q}): need sigma > 0 and 0 < q <= 1")
    return _epsilon_cached(entries, float(delta), relation)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for which `steps` steps at `sample_rate` spend the target under replace-one.

    Deterministic (a fixed bisection), so `privacy verify` recomputes exactly the same sigma.
    """
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"privacy target must have epsilon > 0 and 0 < delta < 1, got ({target_epsilon}, {delta})")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")

    def excess(sigma: float) -> float:
        return epsilon_of([(sigma, sample_rate, steps)], delta) - target_epsilon

    low, high = 0.3, 1.5
    f_low, f_high = excess(low), excess(high)
    while f_high > 0:  # more noise until the plan fits
        low, f_low, high = high, f_high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at q={sample_rate}")
        f_high = excess(high)
    while f_low <= 0 and low > 1e-3:  # less noise until it does not
        high, f_high, low = low, f_low, low / 2
        f_low = excess(low)
    # Illinois regula falsi on eps(sigma) - target; keep the fitting side (f_high <= 0) as the answer.
    side = 0
    for _ in range(30):
        if -f_high <= CALIBRATION_TOLERANCE or high - low < 1e-7:
            break
        mid = high - f_high * (high - low) / (f_high - f_low)
        f_mid = excess(mid)
        if f_mid <= 0:
            high, f_high = mid, f_mid
            if side == -1:
                f_low /= 2
            side = -1
        else:
            low, f_low = mid, f_mid
            if side == 1:
                f_high /= 2
            side = 1
    return high


def sample_rate_for(num_records: int, batch_size: int) -> float:
    """The Poisson rate Opacus uses for a loader of this size (1 / number of batches per epoch)."""
    if num_records <= 0 or batch_size <= 0:
        raise ValueError(f"sample rate needs positive records and batch size, got {num_records}, {batch_size}")
    return 1.0 / math.ceil(num_records / min(batch_size, num_records))


@dataclass
class SiteBudget:
    """One site's plan for one run and what it has spent: everything the certificate needs.

    `prior_history` is what the site's lifetime ledger already holds for these records; this run adds
    `steps` at (noise_multiplier, sample_rate). Every field is a function of the public plan (config and
    the declared record count N) or a step count, so the whole budget may leave the site.
    """

    site: str
    target_epsilon: float
    lifetime_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    planned_steps: int
    num_records: int
    steps: int = 0
    prior_history: History = field(default_factory=list)

    def history(self) -> History:
        return compress_history(list(self.prior_history) + [(self.noise_multiplier, self.sample_rate, self.steps)])

    def epsilon(self, relation: str = HEADLINE_RELATION) -> float:
        """Spent so far on these records, over the site's lifetime."""
        return epsilon_of(self.history(), self.delta, relation)

    def certified_epsilon(self, relation: str = HEADLINE_RELATION) -> float:
        """What the release may claim: the prior spend plus the whole plan, however many steps were taken."""
        planned = max(self.planned_steps, self.steps)
        return epsilon_of(list(self.prior_history) + [(self.noise_multiplier, self.sample_rate, planned)], self.delta, relation)

    def affordable(self, wanted: int) -> int:
        """Largest n <= wanted that stays within the plan, this run's target and the lifetime budget."""
        wanted = min(wanted, self.planned_steps - self.steps)
        if wanted <= 0:
            return 0

        def fits(n: int) -> bool:
            run = [(self.noise_multiplier, self.sample_rate, self.steps + n)]
            return (
                epsilon_of(run, self.delta) <= self.target_epsilon
                and epsilon_of(list(self.prior_history) + run, self.delta) <= self.lifetime_epsilon
            )

        if fits(wanted):
            return wanted
        low, high = 0, wanted  # fits(low) holds, fits(high) does not
        if not fits(0):
            return 0
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    @property
    def exhausted(self) -> bool:
        return self.affordable(1) == 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SiteBudget":
        raw = json.loads(text)
        raw["prior_history"] = [tuple(entry) for entry in raw.get("prior_history", [])]
        return cls(**raw)


def compress_history(history: History) -> History:
    """Merge consecutive entries with the same (sigma, q); drop empty ones."""
    merged: History = []
    for sigma, q, n in history:
        if n <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + int(n))
        else:
            merged.append((float(sigma), float(q), int(n)))
    return merged


def planned_noise(privacy, sample_rate: float, planned_steps: int) -> float:
    """The configured noise multiplier, or the one calibrated so the plan spends exactly the target."""
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    return calibrate_noise(privacy.target_epsilon, privacy.delta, sample_rate, planned_steps)


def plan_budget(site: str, privacy, batch_size: int, num_records: int, planned_steps: int,
                prior_history: History | None = None) -> SiteBudget:
    """Sample rate and noise for a site, so that its planned steps spend exactly its target."""
    if num_records == 0:
        raise ValueError(f"site {site}: no training records")
    sample_rate = sample_rate_for(num_records, batch_size)
    lifetime = privacy.lifetime_epsilon if privacy.lifetime_epsilon is not None else privacy.target_epsilon
    return SiteBudget(
        site=site,
        target_epsilon=privacy.target_epsilon,
        lifetime_epsilon=float(lifetime),
        delta=privacy.delta,
        noise_multiplier=planned_noise(privacy, sample_rate, planned_steps),
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate,
        planned_steps=planned_steps,
        num_records=num_records,
        prior_history=list(prior_history or []),
    )
