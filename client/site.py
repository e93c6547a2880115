"""What a hospital (site) does: find its own records, keep its privacy ledger, train a round, evaluate locally.

The Flower handlers in client_app.py are thin adapters over these functions, which a unit test can call
directly. What leaves a site under DP: the weights, and numbers that are functions of the public plan
(the declared record count N, the noise, sample rate and planned steps, the steps taken and the epsilon
spent). Losses, timings and memorization reports stay in the site's own state directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.audit import audit_summary, coins_for_run, site_canaries, with_canaries
from client.release import kept_release, save_release, weights_digest
from common.config import Config
from common.data.dataset import ECGDataset, load_dataset
from common.data.metadata import load_metadata
from common.data.partition import make_partition
from common.data.partition_types import Partition
from common.data.patient_choice import one_record_per_patient
from common.diffusion import GaussianDiffusion
from common.model.denoiser import build_denoiser
from common.normalization import federated_normalizer
from common.privacy import SiteBudget, SiteLedger, plan_budget
from common.privacy.certificate import planned_steps
from common.train import TrainingData, TrainResult, train_local

log = logging.getLogger("fedecg.client")


@dataclass
class SiteData:
    index: int  # position in the partition; the server names sites by it
    name: str
    train: ECGDataset
    holdout: ECGDataset  # the site's local validation share: never trained on

    @property
    def record_ids(self) -> list[int]:
        return sorted(int(i) for i in np.concatenate([self.train.ecg_ids, self.holdout.ecg_ids]))


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
    data = SiteData(index=index, name=site.name, train=train, holdout=holdout)
    _SITE_CACHE[key] = data
    return data


def open_ledger(cfg: Config, site: SiteData, node_config: dict[str, Any]) -> SiteLedger:
    """The site's state directory (ledger, secret key, local logs): node_config `state-dir`, else the config's."""
    root = node_config.get("state-dir") or cfg.federation.site_state_dir
    return SiteLedger.open(root, site.name, site.record_ids)


def public_seed(cfg: Config, site: str, server_round: int) -> int:
    """Seed of a non-private round (reproducible from the config by design: nothing is promised)."""
    digest = hashlib.sha256(f"{cfg.train.seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def train_round(
    cfg: Config,
    site: SiteData,
    ledger: SiteLedger,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    run_key: str,
    proximal_mu: float,
    progress: bool = False,
    resend_release: bool = False,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, float], SiteBudget | None]:
    """One round of local training from the global weights.

    Returns (weights or None when the budget is spent, the public metrics, the budget). Under DP the steps
    are reserved in the ledger before the first one is taken, and every draw comes from the ledger's secret.
    With `resend_release` (aggregation in the clear), a round asked for again from the same global weights
    gets the weights released for it the first time, at no new spend (client/release.py).
    """
    model = build_denoiser(cfg.model)
    model.load_state_dict(global_state)
    data = TrainingData.from_dataset(site.train, federated_normalizer())
    if cfg.audit.pairs_per_site:
        data = with_canaries(data, site_canaries(cfg, site.index, data.signals.shape[-1]),
                             coins_for_run(cfg, ledger.directory, run_key))
    diffusion = GaussianDiffusion(cfg.diffusion)
    description = f"site {site.name} round {server_round}"
    fc = cfg.federation
    tuning = {"proximal_mu": proximal_mu, "lr": fc.local_lr, "trainable": fc.trainable, "progress": progress,
              "description": description}
    if not cfg.privacy.enabled:
        result = train_local(model, diffusion, data, cfg, steps=fc.local_steps,
                             seed=public_seed(cfg, site.name, server_round), **tuning)
        _log_round(ledger, server_round, result)
        metrics = {**_plan_metrics(site, len(data), result.steps), "loss": result.loss, "eps-loss": result.eps_loss,
                   "mel-loss": result.mel_loss, "train-seconds": result.seconds}
        return _plain(model), metrics, None
    start = weights_digest(global_state) if resend_release else ""
    with ledger.locked():
        budget = ledger.budget(run_key, lambda: plan_budget(
            site.name, cfg.privacy, cfg.train.batch_size, len(data), planned_steps(cfg, "federated")))
        kept = kept_release(ledger.directory, run_key, server_round, start) if resend_release else None
        if kept is not None:
            log.warning("site %s: round %d was asked for again from the same weights; sending the weights "
                        "released for it before (no new spend)", site.name, server_round)
            return kept[0], kept[1], budget
        steps = ledger.reserve(run_key, budget, cfg.federation.local_steps)
        randomness = ledger.next_randomness()
        if steps == 0:
            return None, _budget_metrics(site, budget, 0), budget
        result = train_local(model, diffusion, data, cfg, steps=steps, budget=budget, randomness=randomness, **tuning)
        state, metrics = _plain(model), _budget_metrics(site, budget, steps)
        if resend_release:  # under SecAgg+ a kept release would never be sent: keep no copy of it
            save_release(ledger.directory, run_key, server_round, start, state, metrics)
    _log_round(ledger, server_round, result)
    return state, metrics, budget


def _plain(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _plan_metrics(site: SiteData, num_records: int, steps: int) -> dict[str, float]:
    # N is published (the certificate's replace-one relation), so FedAvg may weight by it. An audit run's N
    # counts one record per canary slot whichever candidate the secret coin chose.
    return {"site-index": site.index, "num-records": num_records, "steps": steps}


def _budget_metrics(site: SiteData, budget: SiteBudget, steps: int) -> dict[str, float]:
    """Functions of the public plan only: the declared N, the plan, the steps taken, the epsilon spent."""
    return {
        **_plan_metrics(site, budget.num_records, steps),
        "steps-total": budget.steps,
        "planned-steps": budget.planned_steps,
        "epsilon": budget.epsilon(),
        "budget-exhausted": int(budget.exhausted),
    }


def _log_round(ledger: SiteLedger, server_round: int, result: TrainResult) -> None:
    """The site's own training log: losses and timings stay here, for the site's operator."""
    path = ledger.directory / "train_log.csv"
    new = not path.exists()
    with path.open("a") as handle:
        if new:
            handle.write("time,round,steps,loss,eps_loss,mel_loss,seconds,empty_batches\n")
        handle.write(f"{time.time():.0f},{server_round},{result.steps},{result.loss:.6g},{result.eps_loss:.6g},"
                     f"{result.mel_loss:.6g},{result.seconds:.3f},{result.empty_batches}\n")


def audit_site(cfg: Config, site: SiteData, ledger: SiteLedger, final_state: dict[str, torch.Tensor],
               run_key: str) -> dict[str, float]:
    """The site's audit summary for `run_key` (see client/audit.py for what it contains and why it may leave)."""
    from common.bundle import initial_state

    if not cfg.audit.pairs_per_site:
        raise ValueError("the server asked for a canary audit, but this run's config plants no canaries (audit.pairs_per_site)")
    coins_path = ledger.directory / "audit" / f"{run_key}.json"
    if not coins_path.is_file():
        raise ValueError(f"site {site.name} planted no canaries under run key {run_key[:8]}... (it never trained in this run)")
    canaries = site_canaries(cfg, site.index, site.train.signals.shape[-1])
    return audit_summary(cfg, final_state, initial_state(cfg)[0], canaries, coins_for_run(cfg, ledger.directory, run_key))


def evaluate_memorization(cfg: Config, site: SiteData, ledger: SiteLedger, global_state: dict[str, torch.Tensor]) -> Path:
    """Memorization of the site's own records by the global model, computed inside the site.

    Synthetic records are generated with the conditions of the site's training records; distances to
    the site's training records are compared with distances to its holdout, and a loss-based membership
    attack scores training against holdout records. The report is written to the site's state directory
    for its operator (`memorization.json`): with a small reference set these numbers reveal single records,
    so none of them leaves the site.
    """
    from common.bundle import build_generator
    from common.data.leads import select_model_leads
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
    report = {"site": site.name, "records": n, "time": time.time(), **metrics}
    path = ledger.directory / "memorization.json"
    path.write_text(json.dumps(report, indent=2))
    return path
