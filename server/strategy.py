"""Aggregation strategies, their checkpointable state, and the per-site privacy ledger."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import Config
from common.privacy import SiteBudget
from common.bundle import load_weights, save_weights

import torch


def build_strategy(cfg: Config) -> FedAvg:
    fc = cfg.federation
    common = dict(
        fraction_train=fc.fraction_train,
        fraction_evaluate=0.0,  # site-side evaluation is requested explicitly at the end
        min_train_nodes=fc.min_sites,
        min_available_nodes=fc.min_sites,
        weighted_by_key="num-examples",
    )
    if fc.strategy == "fedavg":
        return FedAvg(**common)
    if fc.strategy == "fedprox":
        return FedProx(proximal_mu=fc.proximal_mu, **common)
    if fc.strategy == "fedadam":
        return FedAdam(eta=fc.server_lr, beta_1=fc.server_beta1, beta_2=fc.server_beta2, tau=fc.server_tau, **common)
    raise ValueError(f"unknown strategy {fc.strategy!r}")


def strategy_state(strategy: FedAvg) -> dict[str, torch.Tensor]:
    """Server-optimizer moments (FedAdam); FedAvg/FedProx are stateless across rounds."""
    tensors: dict[str, torch.Tensor] = {}
    for slot in ("m_t", "v_t"):
        moments = getattr(strategy, slot, None)
        if moments:
            for name, value in moments.items():
                tensors[f"{slot}/{name}"] = torch.from_numpy(np.ascontiguousarray(value))
    return tensors


def restore_strategy_state(strategy: FedAvg, tensors: dict[str, torch.Tensor]) -> None:
    for slot in ("m_t", "v_t"):
        prefix = f"{slot}/"
        moments = {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
        if moments:
            if not hasattr(strategy, slot):
                raise ValueError(f"checkpoint holds {slot} but strategy {type(strategy).__name__} has none")
            setattr(strategy, slot, moments)


def save_strategy_state(path: Path, strategy: FedAvg) -> None:
    tensors = strategy_state(strategy)
    # safetensors refuses an empty dict's metadata-only file on some versions; keep a marker tensor.
    tensors.setdefault("_empty", torch.zeros(1))
    save_weights(path, tensors)


def load_strategy_state(path: Path, strategy: FedAvg) -> None:
    tensors = {k: v for k, v in load_weights(path).items() if k != "_empty"}
    restore_strategy_state(strategy, tensors)


@dataclass
class PrivacyLedger:
    """The server's view of every site's spend, rebuilt from the scalar metrics sites report."""

    sites: dict[str, dict[str, float]] = field(default_factory=dict)

    def update(self, site: str, metrics: dict[str, float]) -> None:
        keep = (
            "epsilon", "target-epsilon", "delta", "noise-multiplier", "max-grad-norm", "sample-rate",
            "steps-total", "planned-steps", "num-records", "num-patients", "max-records-per-patient",
            "budget-exhausted",
        )
        entry = self.sites.setdefault(site, {})
        entry.update({k: float(metrics[k]) for k in keep if k in metrics})

    def budgets(self, cfg: Config) -> list[SiteBudget]:
        """Reconstruct each site's accountant history: sigma and q are fixed per site, so one entry."""
        out = []
        for name, m in sorted(self.sites.items()):
            steps = int(m.get("steps-total", 0))
            budget = SiteBudget(
                site=name,
                target_epsilon=m["target-epsilon"],
                delta=m["delta"],
                accountant=cfg.privacy.accountant,
                noise_multiplier=m["noise-multiplier"],
                max_grad_norm=m["max-grad-norm"],
                sample_rate=m["sample-rate"],
                planned_steps=int(m["planned-steps"]),
                num_records=int(m["num-records"]),
                num_patients=int(m["num-patients"]),
                max_records_per_patient=int(m["max-records-per-patient"]),
                history=[(m["noise-multiplier"], m["sample-rate"], steps)] if steps else [],
                exhausted=bool(m.get("budget-exhausted", 0)),
            )
            out.append(budget)
        return out

    def table(self) -> str:
        header = f"{'site':>8} {'epsilon':>9} {'target':>7} {'sigma':>7} {'q':>8} {'steps':>6} {'records':>8}"
        lines = [header, "-" * len(header)]
        for name, m in sorted(self.sites.items()):
            lines.append(
                f"{name:>8} {m.get('epsilon', math.nan):9.4f} {m.get('target-epsilon', math.nan):7.2f} "
                f"{m.get('noise-multiplier', math.nan):7.3f} {m.get('sample-rate', math.nan):8.5f} "
                f"{int(m.get('steps-total', 0)):6d} {int(m.get('num-records', 0)):8d}"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.sites, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        return cls(sites=json.loads(text))
