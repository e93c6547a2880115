"""Aggregation strategies, their checkpointable state, and the per-site privacy ledger."""

from __future__ import annotations

import json
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
        weighted_by_key="num-records",  # declared N: public, published in the certificate
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


class LedgerConflict(RuntimeError):
    """A site report that would make the certificate under-count: a second node for one site, or lost steps."""


@dataclass
class PrivacyLedger:
    """The server's view of every site's spend, from the budgets sites report (public-plan values only).

    A site name is bound to the first node that reports it; another node claiming it is refused, and a
    site whose step count goes backwards (lost state) is refused too. Bindings are per server process:
    node ids change when a run resumes. With a site registry (`seed`), the bindings are the registry's from
    the start, across resumes: a node may report only its registered site, and an unregistered name is refused.
    """

    sites: dict[str, dict] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    registered: bool = False  # the bindings came from a site registry: no other name, no other node

    def seed(self, registry: dict[str, int]) -> None:
        """Bind each site name to its registered node id (server/site_registry.py) before any reply arrives."""
        self.nodes = dict(registry)
        self.registered = True

    def bind(self, node_id: int, site: str) -> None:
        """Accept that authenticated node `node_id` is site `site`, or raise LedgerConflict."""
        if self.registered:
            registered = self.nodes.get(site)
            if registered is None:
                raise LedgerConflict(f"node {node_id} claims site {site}, which the site registry does not name")
            if registered != node_id:
                own = [name for name, node in self.nodes.items() if node == node_id]
                raise LedgerConflict(
                    f"node {node_id} claims site {site}, registered to node {registered}; node {node_id} is "
                    f"{'registered as ' + own[0] if own else 'in no registry entry'}")
            return
        bound = self.nodes.setdefault(site, node_id)
        if bound != node_id:
            raise LedgerConflict(f"nodes {bound} and {node_id} both claim site {site}; each site must run on one node")

    def update(self, node_id: int, site: str, budget_json: str) -> SiteBudget:
        self.bind(node_id, site)
        budget = SiteBudget.from_json(budget_json)
        if budget.site != site:
            raise LedgerConflict(f"node {node_id} reports site {site} with the budget of site {budget.site}")
        previous = self.sites.get(site)
        if previous is not None:
            before = SiteBudget.from_json(previous["budget"])
            if budget.steps < before.steps or budget.prior_history != before.prior_history:
                raise LedgerConflict(
                    f"site {site} reports {budget.steps} steps after {before.steps} (or a changed prior history): "
                    "its ledger lost state, and the certificate would under-count"
                )
            for key in ("noise_multiplier", "sample_rate", "planned_steps", "num_records"):
                if getattr(budget, key) != getattr(before, key):
                    raise LedgerConflict(f"site {site} changed its {key} mid-run")
        self.sites[site] = {"budget": budget_json}
        return budget

    def budgets(self) -> list[SiteBudget]:
        return [SiteBudget.from_json(entry["budget"]) for _, entry in sorted(self.sites.items())]

    def table(self) -> str:
        header = f"{'site':>8} {'epsilon':>9} {'add/rem':>8} {'target':>7} {'sigma':>7} {'q':>8} {'steps':>6} {'records':>8}"
        lines = [header, "-" * len(header)]
        for b in self.budgets():
            lines.append(
                f"{b.site:>8} {b.certified_epsilon():9.4f} {b.certified_epsilon('add_remove'):8.4f} "
                f"{b.target_epsilon:7.2f} {b.noise_multiplier:7.3f} {b.sample_rate:8.5f} {b.steps:6d} {b.num_records:8d}"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.sites, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        return cls(sites=json.loads(text))
