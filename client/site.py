"""What a hospital (site) does: find its own records, keep its privacy budget, train a round, evaluate locally.

The Flower handlers in client_app.py are thin adapters over these functions, which a unit test can call
directly. Nothing here returns records: only weights and aggregate numbers leave the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import Config
from common.data.partition import Partition, make_partition, one_record_per_patient
from common.data.ptbxl import ECGDataset, load_dataset, load_metadata
from common.diffusion import GaussianDiffusion
from common.model.denoiser import build_denoiser
from common.normalization import federated_normalizer
from common.privacy import SiteBudget, plan_budget
from common.train import TrainingData, train_local

log = logging.getLogger("fedecg.client")


@dataclass
class SiteData:
    index: int  # position in the partition; the server names sites by it
    name: str
    train: ECGDataset
    holdout: ECGDataset  # the site's local validation share: never trained on
    max_records_per_patient: int

    @property
    def num_patients(self) -> int:
        return int(len(np.unique(self.train.patient_ids)))


_SITE_CACHE: dict[tuple[str, str], SiteData] = {}


def site_from_node_config(node_config: dict[str, Any], partition: Partition) -> int:
    """Index of this node's site: partition-id in simulation, `site` (name or index) in deployment."""
    names = [s.name for s in partition.sites]
    if "site" in node_config:
        site = str(node_config["site"])
        if site in names:
            return names.index(site)
        if site.isdigit() and int(site) < len(names):
            return int(site)
        raise ValueError(f"node_config site={site!r} is not one of the partition's sites {names}")
    if "partition-id" in node_config:
        index = int(node_config["partition-id"])
        total = int(node_config.get("num-partitions", len(names)))
        if total != len(names):
            raise ValueError(
                f"the federation has {total} SuperNodes but the partition defines {len(names)} sites "
                f"(partition.num_sites); make them equal"
            )
        return index
    raise ValueError("node_config names no site: set 'site' (deployment) or run under simulation (partition-id)")


def load_site(cfg: Config, node_config: dict[str, Any]) -> SiteData:
    """The site's training records (privacy unit applied) and its local holdout, cached per process."""
    data_cfg = cfg.data
    if "data-root" in node_config:
        from dataclasses import replace

        data_cfg = replace(data_cfg, root=str(node_config["data-root"]))
        cfg = replace(cfg, data=data_cfg)
    meta = load_metadata(data_cfg)
    partition = make_partition(meta, cfg.partition)
    index = site_from_node_config(node_config, partition)
    key = (repr(data_cfg), hashlib.sha256(json.dumps([repr(cfg.partition), cfg.privacy.unit, index]).encode()).hexdigest())
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    site = partition.sites[index]
    train_ids = list(site.train_ids)
    if cfg.privacy.unit == "patient":
        train_ids = list(one_record_per_patient(train_ids, meta.loc[train_ids, "patient_id"].to_numpy(), cfg.partition.seed))
    dataset = load_dataset(data_cfg, ecg_ids=sorted(set(train_ids) | set(site.val_ids)), progress=False)
    train = dataset.subset(train_ids)
    holdout = dataset.subset(list(site.val_ids))
    _, counts = np.unique(train.patient_ids, return_counts=True)
    data = SiteData(index=index, name=site.name, train=train, holdout=holdout, max_records_per_patient=int(counts.max(initial=0)))
    _SITE_CACHE[key] = data
    return data


def budget_path(state_dir: str | Path, site: str) -> Path:
    return Path(state_dir) / f"site_{site}" / "privacy_budget.json"


def load_or_plan_budget(cfg: Config, site: SiteData, stored: str | None, state_file: Path | None) -> SiteBudget:
    """The site's budget: from this run's state, else from disk (resumed runs), else planned afresh."""
    text = stored
    if text is None and state_file is not None and state_file.is_file():
        text = state_file.read_text()
    if text is not None:
        budget = SiteBudget.from_json(text)
        if budget.site != site.name:
            raise ValueError(f"stored budget belongs to site {budget.site}, not {site.name}")
        return budget
    planned = cfg.federation.rounds * cfg.federation.local_steps
    return plan_budget(
        site=site.name,
        privacy=cfg.privacy,
        batch_size=cfg.train.batch_size,
        num_records=len(site.train),
        num_patients=site.num_patients,
        max_records_per_patient=site.max_records_per_patient,
        planned_steps=planned,
    )


def round_seed(cfg: Config, site: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{cfg.train.seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def train_round(
    cfg: Config,
    site: SiteData,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    budget: SiteBudget | None,
    proximal_mu: float,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training from the global weights; returns plain weights and scalar metrics."""
    seed = round_seed(cfg, site.name, server_round)
    torch.manual_seed(seed)
    model = build_denoiser(cfg.model)
    model.load_state_dict(global_state)
    data = TrainingData.from_dataset(site.train, federated_normalizer())
    result = train_local(
        model,
        GaussianDiffusion(cfg.diffusion),
        data,
        cfg,
        steps=cfg.federation.local_steps,
        budget=budget,
        proximal_mu=proximal_mu,
        seed=seed,
        progress=progress,
        description=f"site {site.name} round {server_round}",
    )
    metrics: dict[str, float] = {
        "site-index": site.index,
        "num-examples": int(result.examples),
        "steps": int(result.steps),
        "loss": float(result.loss),
        "eps-loss": float(result.eps_loss),
        "mel-loss": float(result.mel_loss),
        "train-seconds": float(result.seconds),
        "num-records": len(site.train),
        "num-patients": site.num_patients,
        "max-records-per-patient": site.max_records_per_patient,
        "budget-exhausted": int(result.budget_exhausted),
    }
    if budget is not None:
        metrics.update(
            {
                "epsilon": budget.epsilon(),
                "target-epsilon": budget.target_epsilon,
                "delta": budget.delta,
                "noise-multiplier": budget.noise_multiplier,
                "max-grad-norm": budget.max_grad_norm,
                "sample-rate": budget.sample_rate,
                "steps-total": budget.steps,
                "planned-steps": budget.planned_steps,
            }
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, metrics


def default_state_dir(run_dir: str, run_id: int) -> Path:
    """Where a site keeps its accountant history: the run directory in simulation, else a per-run folder."""
    if run_dir:
        return Path(run_dir) / "sites"
    return Path(".fedecg-site-state") / f"run-{run_id}"


def evaluate_memorization(cfg: Config, site: SiteData, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Memorization of the site's own records by the global model, computed inside the site.

    Synthetic records are generated with the conditions of the site's training records; distances to
    the site's training records are compared with distances to its holdout, and a loss-based membership
    attack scores training against holdout records. Only these aggregate scalars leave the site.
    """
    from common.bundle import build_generator
    from common.data.ptbxl import select_model_leads
    from common.evaluation.memorization import site_memorization_metrics
    from common.generate import generate

    n = min(cfg.evaluation.site_records, len(site.train))
    if n < 2 or len(site.holdout) < 1:
        raise ValueError(f"site {site.name}: too few records for a memorization check ({len(site.train)} train, {len(site.holdout)} holdout)")
    rng = np.random.default_rng(cfg.evaluation.seed)
    train = site.train.subset(np.sort(rng.choice(site.train.ecg_ids, n, replace=False)))
    holdout = site.holdout.subset(site.holdout.ecg_ids[: max(1, min(n, len(site.holdout)))])
    gen = build_generator(cfg, global_state, federated_normalizer(), Path("."))
    synthetic12 = generate(gen, train.labels, train.demographics, train.demographics_mask, seed=cfg.evaluation.seed, progress=False)
    metrics = site_memorization_metrics(
        gen.model, gen.diffusion, gen.normalizer, train, holdout, select_model_leads(synthetic12),
        max_records=n, mia_timesteps=cfg.evaluation.mia_timesteps, seed=cfg.evaluation.seed,
    )
    return {"site-index": site.index, "num-examples": n, **{k.replace("_", "-"): v for k, v in metrics.items()}}
