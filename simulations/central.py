"""Central training through the same common.train loop as the sites.

    run_central(cfg, run_dir)                    # the baseline: every training fold, DP if configured
    run_central(cfg, run_dir, pool="public")     # `fedecg pretrain`: the public pool, never DP

The public pool is the training-fold records of the PTB-XL sites in `partition.public_sites`: the
partition keeps them patient-disjoint from every federated site. A pretraining run writes `base.json`
(what it was trained on, its weights' hash) for `federation.init_from` and the certificate.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from common.bundle import WEIGHTS, save_checkpoint, sha256_file
from common.config import Config, config_hash, save as save_config, to_dict
from common.data.partition import make_partition, training_ids
from common.data.ptbxl import load_dataset, load_metadata
from common.diffusion import GaussianDiffusion
from common.generate import generate, grid_conditions
from common.model.denoiser import build_denoiser, count_parameters
from common.plotting import plot_curves, plot_ecg_grid
from common.normalization import federated_normalizer
from common.privacy import SiteLedger, build_certificate, plan_budget, write_certificate
from common.scp import SCP_CODES
from common.train import EMA, TrainingData, train_local

log = logging.getLogger("fedecg.central")


BASE_FORMAT = "fedecg-public-base/1"


def run_central(cfg: Config, run_dir: Path, progress: bool = True, pool: str = "training") -> Path:
    if (run_dir / "checkpoints" / "latest").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose a new --out")
    meta = load_metadata(cfg.data)
    if pool == "public":
        ids = list(make_partition(meta, cfg.partition).public_ids)
        if not ids:
            raise ValueError("pretraining needs a public pool: set partition.public_sites (site scheme) to PTB-XL "
                             "sites that are not in the federation")
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False))  # public data
    elif pool == "training":
        ids = training_ids(meta, cfg.partition)
    else:
        raise ValueError(f"pool must be 'training' or 'public', got {pool!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    dataset = load_dataset(cfg.data, ecg_ids=ids, progress=progress)
    if cfg.privacy.enabled and cfg.privacy.unit == "patient":
        from common.data.partition import one_record_per_patient

        dataset = dataset.subset(one_record_per_patient(dataset.ecg_ids, dataset.patient_ids, cfg.partition.seed))
    # Public constants, as at the sites: statistics fitted on private records would be an unaccounted release.
    normalizer = federated_normalizer()
    data = TrainingData.from_dataset(dataset, normalizer)
    torch.manual_seed(cfg.train.seed)
    model = build_denoiser(cfg.model)
    ema = EMA(model, cfg.train.ema_decay)
    print(f"central training: {len(dataset)} records, model '{cfg.model.size}' with {count_parameters(model):,} parameters")

    budget = randomness = None
    steps = cfg.train.steps
    if cfg.privacy.enabled:
        ledger = SiteLedger.open(cfg.federation.site_state_dir, "central", dataset.ecg_ids)
        run_key = f"central:{run_dir.resolve()}"
        with ledger.locked():
            budget = ledger.budget(run_key, lambda: plan_budget(
                "central", cfg.privacy, cfg.train.batch_size, len(dataset), cfg.train.steps))
            steps = ledger.reserve(run_key, budget, cfg.train.steps)
            randomness = ledger.next_randomness()
        print(f"DP-SGD: sigma={budget.noise_multiplier:.4f}, q={budget.sample_rate:.5f}, C={budget.max_grad_norm}, "
              f"ledger {ledger.directory}")

    rows: list[dict[str, float]] = []
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "eps_loss", "mel_loss", "seconds"])
        writer.writeheader()

        def on_log(row: dict[str, float]) -> None:
            writer.writerow(row)
            handle.flush()
            rows.append(row)

        start = time.perf_counter()
        result = train_local(
            model, GaussianDiffusion(cfg.diffusion), data, cfg, steps,
            budget=budget, randomness=randomness, ema=ema, schedule=True,
            progress=progress, description="pretrain" if pool == "public" else "central", on_log=on_log,
        )
    ema.copy_to(model)  # an average of DP iterates is post-processing: it costs no privacy
    directory = save_checkpoint(
        run_dir / "checkpoints" / "final",
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        cfg,
        normalizer,
        progress={"step": result.steps, "kind": "central", "weights": "ema"},
    )
    (run_dir / "checkpoints" / "latest").write_text(directory.name)
    if budget is not None:
        write_certificate(run_dir / "privacy.json",
                          build_certificate(cfg, [budget], "central", sha256_file(directory / WEIGHTS)))
    if pool == "public":
        _write_base(run_dir, cfg, dataset, directory, result.steps)
    if rows:
        plot_curves(rows, "step", ["loss", "eps_loss", "mel_loss"], run_dir / "curves.png", "central training")

    from common.bundle import build_generator

    gen = build_generator(cfg, model.state_dict(), normalizer, directory)
    labels, demo, mask, titles = grid_conditions(SCP_CODES, cfg.train.num_samples)
    signals = generate(gen, labels, demo, mask, seed=cfg.train.seed, progress=progress)
    plot_ecg_grid(signals, run_dir / "samples.png", titles=titles)
    print(
        f"trained {result.steps} steps in {time.perf_counter() - start:.1f}s "
        f"(final loss {result.loss:.4f}, mel {result.mel_loss:.4f})\nrun directory: {run_dir}"
    )
    return run_dir


def _write_base(run_dir: Path, cfg: Config, dataset, checkpoint: Path, steps: int) -> None:
    """Provenance of a public base model, for `federation.init_from`, the certificate and the model card."""
    base = {
        "format": BASE_FORMAT,
        "trained_on": f"PTB-XL sites {list(cfg.partition.public_sites)}, training folds {list(cfg.partition.train_folds)}, "
                      f"declared public; without DP",
        "records": len(dataset),
        "patients": int(len(np.unique(dataset.patient_ids))),
        "steps": steps,
        "weights_sha256": sha256_file(checkpoint / WEIGHTS),
        "config_sha256": config_hash(cfg),
        "partition": to_dict(cfg)["partition"],
        "model": to_dict(cfg)["model"],
    }
    (run_dir / "base.json").write_text(json.dumps(base, indent=2))
