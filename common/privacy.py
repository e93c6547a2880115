"""DP-SGD bookkeeping: noise calibration, accountants that span rounds, budgets, the DP certificate.

The accountant composes every step a site ever took. Its history, a list of
(noise_multiplier, sample_rate, steps) entries, is carried between rounds (Flower context.state and a
JSON file on disk) and recorded in the certificate, so anyone can recompute epsilon from it.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import Config, PrivacyConfig, config_hash, to_dict

CERTIFICATE_FORMAT = "fedecg-dp-certificate/1"
# Two computations of the same epsilon agree far tighter than this; a mismatch beyond it is tampering.
VERIFY_RTOL = 1e-6

History = list[tuple[float, float, int]]


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon of the composition of every (sigma, q, steps) entry in `history`."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) for which `steps` steps at `sample_rate` spend the target."""
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"privacy target must have epsilon > 0 and 0 < delta < 1, got ({target_epsilon}, {delta})")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )


def affordable_steps(
    history: History, sigma: float, sample_rate: float, target_epsilon: float, delta: float, accountant: str, wanted: int
) -> int:
    """Largest n <= wanted such that the history plus n more steps stays within the target epsilon."""
    if wanted <= 0:
        return 0

    def fits(n: int) -> bool:
        return epsilon_of(history + [(sigma, sample_rate, n)], delta, accountant) <= target_epsilon

    if fits(wanted):
        return wanted
    low, high = 0, wanted  # fits(low) holds (history alone fits or we return 0), fits(high) fails
    if not fits(0):
        return 0
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def compress_history(history: History) -> History:
    """Merge consecutive entries with the same (sigma, q), as Opacus does step by step."""
    merged: History = []
    for sigma, q, n in history:
        if n <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + n)
        else:
            merged.append((float(sigma), float(q), int(n)))
    return merged


@dataclass
class SiteBudget:
    """Everything needed to account for, and later verify, one site's privacy spend."""

    site: str
    target_epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    planned_steps: int
    num_records: int
    num_patients: int
    max_records_per_patient: int
    history: History = field(default_factory=list)
    exhausted: bool = False

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def record(self, steps: int) -> None:
        self.history = compress_history(self.history + [(self.noise_multiplier, self.sample_rate, steps)])

    def affordable(self, wanted: int) -> int:
        return affordable_steps(
            self.history, self.noise_multiplier, self.sample_rate, self.target_epsilon, self.delta, self.accountant, wanted
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SiteBudget":
        raw = json.loads(text)
        raw["history"] = [tuple(entry) for entry in raw["history"]]
        return cls(**raw)


def plan_budget(
    site: str,
    privacy: PrivacyConfig,
    batch_size: int,
    num_records: int,
    num_patients: int,
    max_records_per_patient: int,
    planned_steps: int,
) -> SiteBudget:
    """Sample rate and noise for a site, so that its planned steps spend exactly its target."""
    if num_records == 0:
        raise ValueError(f"site {site}: no training records")
    sample_rate = sample_rate_for(num_records, batch_size)
    if privacy.noise_multiplier is not None:
        sigma = float(privacy.noise_multiplier)
    else:
        sigma = calibrate_noise(privacy.target_epsilon, privacy.delta, sample_rate, planned_steps, privacy.accountant)
    return SiteBudget(
        site=site,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate,
        planned_steps=planned_steps,
        num_records=num_records,
        num_patients=num_patients,
        max_records_per_patient=max_records_per_patient,
    )


def sample_rate_for(num_records: int, batch_size: int) -> float:
    """The Poisson rate Opacus uses for a loader of this size (1 / number of batches per epoch)."""
    return 1.0 / math.ceil(num_records / min(batch_size, num_records))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("flwr", "opacus", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_certificate(cfg: Config, budgets: list[SiteBudget]) -> dict[str, Any]:
    """The DP certificate: per-site spend and the release guarantee (max over patient-disjoint sites)."""
    sites = []
    for b in budgets:
        sites.append(
            {
                "site": b.site,
                "epsilon": b.epsilon(),
                "target_epsilon": b.target_epsilon,
                "noise_multiplier": b.noise_multiplier,
                "max_grad_norm": b.max_grad_norm,
                "sample_rate": b.sample_rate,
                "steps": b.steps,
                "planned_steps": b.planned_steps,
                "history": [list(entry) for entry in b.history],
                "num_records": b.num_records,
                "num_patients": b.num_patients,
                "max_records_per_patient": b.max_records_per_patient,
                "budget_exhausted": b.exhausted,
            }
        )
    release_epsilon = max((s["epsilon"] for s in sites), default=0.0)
    unit = cfg.privacy.unit
    max_per_patient = max((s["max_records_per_patient"] for s in sites), default=0)
    statement = (
        f"({release_epsilon:.4g}, {cfg.privacy.delta:g})-DP at the {unit} level for every contributing "
        f"{'patient' if unit == 'patient' else 'record'}. Sites are patient-disjoint, so each patient's data "
        f"is used only at their own site and is covered by that site's epsilon (parallel composition); the "
        f"release epsilon is the maximum over sites."
    )
    if unit == "record" and max_per_patient > 1:
        group = max_per_patient
        statement += (
            f" Record-level DP is not patient-level DP: a patient may contribute up to {group} records, "
            f"and group privacy then gives a weaker guarantee for that patient."
        )
    return {
        "format": CERTIFICATE_FORMAT,
        "unit": unit,
        "delta": cfg.privacy.delta,
        "accountant": cfg.privacy.accountant,
        "mechanism": "DP-SGD with Poisson subsampling (Opacus), per-sample clipping, Gaussian noise",
        "sites": sites,
        "release": {
            "epsilon": release_epsilon,
            "delta": cfg.privacy.delta,
            "unit": unit,
            "max_records_per_patient": max_per_patient,
            "statement": statement,
        },
        "versions": library_versions(),
        "config_sha256": config_hash(cfg),
        "config": to_dict(cfg),
    }


def write_certificate(path: str | Path, certificate: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(certificate, indent=2, sort_keys=False))
    return path


def verify_certificate(certificate: dict[str, Any]) -> list[str]:
    """Recompute every site's epsilon from its recorded history; return the list of mismatches (empty: valid)."""
    problems: list[str] = []
    if certificate.get("format") != CERTIFICATE_FORMAT:
        return [f"unknown certificate format {certificate.get('format')!r}"]
    delta = certificate["delta"]
    accountant = certificate["accountant"]
    if accountant not in ("prv", "rdp"):
        return [f"unknown accountant {accountant!r}"]
    computed_max = 0.0
    for site in certificate["sites"]:
        name = site["site"]
        history = [tuple(entry) for entry in site["history"]]
        for sigma, q, _ in history:
            if not math.isclose(sigma, site["noise_multiplier"], rel_tol=1e-12) or not math.isclose(
                q, site["sample_rate"], rel_tol=1e-12
            ):
                problems.append(f"site {name}: history entry (sigma={sigma}, q={q}) differs from the recorded sigma/q")
        steps = sum(int(n) for _, _, n in history)
        if steps != site["steps"]:
            problems.append(f"site {name}: history has {steps} steps, certificate says {site['steps']}")
        eps = epsilon_of(history, delta, accountant)
        computed_max = max(computed_max, eps)
        if not math.isclose(eps, site["epsilon"], rel_tol=VERIFY_RTOL, abs_tol=1e-9):
            problems.append(f"site {name}: recomputed epsilon {eps:.6g} != certified {site['epsilon']:.6g}")
        if eps > site["target_epsilon"] * (1 + 1e-9):
            problems.append(f"site {name}: epsilon {eps:.6g} exceeds its target {site['target_epsilon']:.6g}")
        if not 0 < site["sample_rate"] <= 1:
            problems.append(f"site {name}: sample rate {site['sample_rate']} outside (0, 1]")
    release = certificate["release"]
    if not math.isclose(release["epsilon"], computed_max, rel_tol=VERIFY_RTOL, abs_tol=1e-9):
        problems.append(f"release epsilon {release['epsilon']:.6g} != max over recomputed sites {computed_max:.6g}")
    if release["delta"] != delta:
        problems.append(f"release delta {release['delta']} != certificate delta {delta}")
    if release["unit"] != certificate["unit"]:
        problems.append("release unit differs from the certificate unit")
    if certificate["unit"] == "patient" and any(s["max_records_per_patient"] > 1 for s in certificate["sites"]):
        problems.append("patient-level unit claimed but a site used more than one record per patient")
    return problems
