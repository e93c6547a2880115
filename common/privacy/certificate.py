"""The DP certificate: what was promised, to whom, under which neighbouring relation, and how to check it.

`verify_certificate` recomputes everything that is a function of the public plan: the config's hash, each
site's sample rate from its declared record count and the batch size, the planned steps from the rounds
and local steps, that the noise multiplier is the calibrated one (or the configured one), every epsilon
under both relations, the release maximum, and (for a bundle) that the weights and config in the bundle
are the ones the certificate names. It cannot prove that the weights were trained as the certificate
says: that needs trust in the sites' code, or attestation.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

from common.config import Config, config_hash, from_dict, hash_matches, to_dict
from common.privacy.accounting import (
    CALIBRATION_TOLERANCE,
    HEADLINE_RELATION,
    SiteBudget,
    compress_history,
    epsilon_of,
    sample_rate_for,
)

CERTIFICATE_FORMAT = "fedecg-dp-certificate/2"
# Two computations of the same epsilon agree far tighter than this; a mismatch beyond it is tampering.
VERIFY_RTOL = 1e-6

NOT_COVERED = [
    "the neighbouring relation is replace-one: each site's record count N is published, and so are the "
    "sample rate and the planned steps that follow from it",
    "hyperparameters and the config were chosen outside DP (by people who may have seen the data)",
    "public data: the preprocessing constants and any public base model the federation started from",
    "properties of a whole site or population (DP hides individuals, not cohorts)",
    "a patient with k records at a record-level site is protected only at group level k",
    "anything a site's operator releases outside this mechanism, such as evaluation reports computed "
    "with access to the training records",
]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("flwr", "opacus", "torch", "dp-accounting"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def planned_steps(cfg: Config, kind: str) -> int:
    return cfg.train.steps if kind == "central" else cfg.federation.rounds * cfg.federation.local_steps


def expected_sites(cfg: Config, kind: str) -> int:
    if kind == "central":
        return 1
    merged = cfg.partition.scheme == "site" and cfg.partition.rest == "merge"
    return cfg.partition.num_sites + int(merged)


def _site_entry(b: SiteBudget) -> dict[str, Any]:
    return {
        "site": b.site,
        "num_records": b.num_records,
        "sample_rate": b.sample_rate,
        "noise_multiplier": b.noise_multiplier,
        "max_grad_norm": b.max_grad_norm,
        "planned_steps": b.planned_steps,
        "steps": b.steps,
        "prior_history": [list(entry) for entry in b.prior_history],
        "history": [list(entry) for entry in b.history()],
        "target_epsilon": b.target_epsilon,
        "lifetime_epsilon": b.lifetime_epsilon,
        "epsilon": b.certified_epsilon(),
        "epsilon_add_remove": b.certified_epsilon("add_remove"),
        "epsilon_spent": b.epsilon(),
        "budget_exhausted": b.exhausted,
    }


def build_certificate(cfg: Config, budgets: list[SiteBudget], kind: str, weights_sha256: str,
                      base_model: dict[str, Any] | None = None,
                      public_expert: dict[str, Any] | None = None) -> dict[str, Any]:
    """The certificate of a release: per-site spend and the release guarantee (max over patient-disjoint sites)."""
    sites = [_site_entry(b) for b in budgets]
    release_epsilon = max((s["epsilon"] for s in sites), default=0.0)
    unit = cfg.privacy.unit
    subject = "patient" if unit == "patient" else "record"
    statement = (
        f"({release_epsilon:.4g}, {cfg.privacy.delta:g})-DP for every contributing {subject}, under the replace-one "
        f"relation (datasets of the published size N that differ in one {subject}). Sites are patient-disjoint, so "
        f"each patient's data is used only at their own site and is covered by that site's epsilon (parallel "
        f"composition); the release epsilon is the maximum over sites. Each site's epsilon covers its whole plan "
        f"and everything its ledger recorded on the same records before this run."
    )
    if unit == "record":
        statement += (
            " Record-level DP is not patient-level DP: a patient with k records is protected at group level k; "
            "use privacy.unit: patient for one record per patient."
        )
    if base_model:
        statement += (
            f" Training started from a public base model ({base_model['trained_on']}, weights sha256 "
            f"{base_model['weights_sha256'][:16]}...): DP covers only the sites' records, not that public data."
        )
    if public_expert:
        statement += (
            f" Sampling asks a public expert at the noise steps t >= {public_expert['answers_from_step']} "
            f"({public_expert['trained_on']}, weights sha256 {public_expert['weights_sha256'][:16]}...): it was "
            f"trained on that public data only, saw no site's record, and the release carries it unchanged."
        )
        if public_expert.get("rhythm_sha256"):
            statement += (
                f" Its beat times are drawn from a rhythm table of the same public records (sha256 "
                f"{public_expert['rhythm_sha256'][:16]}...), also carried unchanged."
            )
    return {
        "format": CERTIFICATE_FORMAT,
        "kind": kind,
        "unit": unit,
        "neighbouring_relation": HEADLINE_RELATION,
        "delta": cfg.privacy.delta,
        "accountant": "dp-accounting PLD (replace-one and add/remove)",
        "mechanism": "DP-SGD with Poisson subsampling (Opacus), per-sample clipping, Gaussian noise from secret "
                     "site-local randomness",
        "sites": sites,
        "release": {
            "epsilon": release_epsilon,
            "epsilon_add_remove": max((s["epsilon_add_remove"] for s in sites), default=0.0),
            "delta": cfg.privacy.delta,
            "unit": unit,
            "neighbouring_relation": HEADLINE_RELATION,
            "statement": statement,
        },
        "not_covered": NOT_COVERED,
        "base_model": base_model,
        "public_expert": public_expert,
        "weights_sha256": weights_sha256,
        "versions": library_versions(),
        "config_sha256": config_hash(cfg),
        "config": to_dict(cfg),
    }


def write_certificate(path: str | Path, certificate: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(certificate, indent=2, sort_keys=False))
    return path


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=VERIFY_RTOL, abs_tol=1e-9)


def _verify_site(site: dict[str, Any], cfg: Config, kind: str, delta: float) -> list[str]:
    name = site["site"]
    problems = []
    privacy = cfg.privacy
    planned = planned_steps(cfg, kind)
    q = sample_rate_for(int(site["num_records"]), cfg.train.batch_size)
    sigma = float(site["noise_multiplier"])
    lifetime = privacy.lifetime_epsilon if privacy.lifetime_epsilon is not None else privacy.target_epsilon
    for key, expected in (("planned_steps", planned), ("sample_rate", q), ("max_grad_norm", privacy.max_grad_norm),
                          ("target_epsilon", privacy.target_epsilon), ("lifetime_epsilon", lifetime)):
        if not _close(float(site[key]), float(expected)):
            problems.append(f"site {name}: {key} {site[key]} is not the {expected} that the config implies")
    if privacy.noise_multiplier is not None:
        if not _close(sigma, privacy.noise_multiplier):
            problems.append(f"site {name}: noise multiplier {sigma} is not the configured {privacy.noise_multiplier}")
    else:
        run_epsilon = epsilon_of([(sigma, q, planned)], delta)
        if not privacy.target_epsilon - CALIBRATION_TOLERANCE * 1.01 <= run_epsilon <= privacy.target_epsilon * (1 + 1e-9):
            problems.append(f"site {name}: noise multiplier {sigma:.6g} is not the one calibrated for the plan "
                            f"(its planned steps spend {run_epsilon:.4f}, the target is {privacy.target_epsilon})")
    steps = int(site["steps"])
    if not 0 <= steps <= planned:
        problems.append(f"site {name}: {steps} steps taken, outside [0, {planned}] planned")
    prior = [tuple(entry) for entry in site["prior_history"]]
    history = compress_history(prior + [(sigma, q, steps)])
    if [tuple(entry) for entry in site["history"]] != [tuple(entry) for entry in history]:
        problems.append(f"site {name}: history is not the prior history plus this run's {steps} steps")
    claimed = prior + [(sigma, q, planned)]
    for key, value in (("epsilon", epsilon_of(claimed, delta)),
                       ("epsilon_add_remove", epsilon_of(claimed, delta, "add_remove")),
                       ("epsilon_spent", epsilon_of(history, delta))):
        if not _close(value, float(site[key])):
            problems.append(f"site {name}: recomputed {key} {value:.6g} != certified {float(site[key]):.6g}")
    if epsilon_of(claimed, delta) > lifetime * (1 + 1e-9):
        problems.append(f"site {name}: epsilon exceeds the lifetime budget {lifetime:g}")
    return problems


def verify_certificate(certificate: dict[str, Any]) -> list[str]:
    """Recompute the certificate from its embedded config; return the list of problems (empty: valid)."""
    if certificate.get("format") != CERTIFICATE_FORMAT:
        return [f"unknown certificate format {certificate.get('format')!r} (expected {CERTIFICATE_FORMAT})"]
    try:
        cfg = from_dict(certificate["config"], source="certificate config")
    except ValueError as err:
        return [f"the embedded config does not load: {err}"]
    problems = []
    if not hash_matches(certificate["config"], certificate.get("config_sha256")):
        problems.append("config_sha256 does not match the embedded config")
    kind = certificate.get("kind")
    if kind not in ("federated", "central"):
        return problems + [f"unknown run kind {kind!r}"]
    if certificate.get("neighbouring_relation") != HEADLINE_RELATION:
        problems.append(f"neighbouring relation {certificate.get('neighbouring_relation')!r} is not {HEADLINE_RELATION}")
    if not cfg.privacy.enabled:
        problems.append("the embedded config has privacy disabled")
    if bool(certificate.get("base_model")) != bool(kind == "federated" and cfg.federation.init_from):
        problems.append("the certificate's base_model does not match federation.init_from in the config")
    expert = certificate.get("public_expert")
    if bool(expert) != bool(cfg.diffusion.expert):
        problems.append("the certificate's public_expert does not match diffusion.expert in the config")
    elif expert and expert.get("answers_from_step") != cfg.diffusion.expert_from:
        problems.append("the certificate's public_expert answers from another step than diffusion.expert_from")
    delta = float(certificate["delta"])
    if delta != cfg.privacy.delta:
        problems.append(f"delta {delta} is not the configured {cfg.privacy.delta}")
    if certificate.get("unit") != cfg.privacy.unit:
        problems.append(f"unit {certificate.get('unit')!r} is not the configured {cfg.privacy.unit!r}")
    sites = certificate["sites"]
    names = [s["site"] for s in sites]
    if len(set(names)) != len(names):
        problems.append(f"a site appears more than once: {names}")
    expected = expected_sites(cfg, kind)
    if len(sites) != expected and not (kind == "federated" and cfg.federation.fraction_train < 1 and len(sites) < expected):
        problems.append(f"{len(sites)} sites certified, the plan has {expected}")
    for site in sites:
        problems += _verify_site(site, cfg, kind, delta)
    release = certificate["release"]
    if not _close(float(release["epsilon"]), max((float(s["epsilon"]) for s in sites), default=0.0)):
        problems.append("release epsilon is not the maximum over the sites")
    if not _close(float(release["epsilon_add_remove"]), max((float(s["epsilon_add_remove"]) for s in sites), default=0.0)):
        problems.append("release add/remove epsilon is not the maximum over the sites")
    for key in ("delta", "unit", "neighbouring_relation"):
        if release.get(key) != certificate.get(key):
            problems.append(f"release {key} differs from the certificate's")
    return problems


def verify_release(directory: str | Path) -> list[str]:
    """A bundle or run directory: its certificate, and that its config and weights are the certified ones."""
    from common.bundle import WEIGHTS, latest_checkpoint
    from common.hashing import sha256_file

    directory = Path(directory)
    path = directory / "privacy.json"
    if not path.is_file():
        return [f"{directory}: no privacy.json"]
    certificate = json.loads(path.read_text())
    problems = verify_certificate(certificate)
    weights = directory / WEIGHTS
    if not weights.is_file() and latest_checkpoint(directory) is not None:
        weights = latest_checkpoint(directory) / WEIGHTS
    if weights.is_file() and sha256_file(weights) != certificate.get("weights_sha256"):
        problems.append(f"{weights.name}: not the weights the certificate was issued for")
    problems += _verify_expert_weights(directory, certificate.get("public_expert"))
    config_file = directory / "config.yaml"
    if config_file.is_file() and certificate.get("format") == CERTIFICATE_FORMAT:
        import yaml

        raw = yaml.safe_load(config_file.read_text())
        from_dict(raw, source=str(config_file))  # loads, or says why not
        if not hash_matches(raw, certificate.get("config_sha256")):
            problems.append("config.yaml is not the config the certificate was issued for")
    return problems


def _verify_expert_weights(directory: Path, expert: dict[str, Any] | None) -> list[str]:
    """A bundle carries exactly the public expert (weights and rhythm table) its certificate names (a run
    directory names it by path)."""
    from common.expert import EXPERT_RHYTHM, EXPERT_WEIGHTS
    from common.hashing import sha256_file

    problems = []
    in_bundle = (directory / "manifest.json").is_file()
    for name, key in ((EXPERT_WEIGHTS, "weights_sha256"), (EXPERT_RHYTHM, "rhythm_sha256")):
        carried = directory / name
        named = (expert or {}).get(key)
        if not carried.is_file():
            if named and in_bundle:
                problems.append(f"the certificate names a public expert {key} but the bundle carries no {name}")
        elif not named:
            problems.append(f"{name}: the bundle carries an expert file its certificate does not name")
        elif sha256_file(carried) != named:
            problems.append(f"{name}: not the public expert the certificate names")
    return problems
