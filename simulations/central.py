"""The central baseline: one model on all training folds, through the same common.train loop as the sites."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch

from common.bundle import WEIGHTS, save_checkpoint, sha256_file
from common.config import Config, save as save_config
from common.data.partition import training_ids
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


def run_central(cfg: Config, run_dir: Path, progress: bool = True) -> Path:
    if (run_dir / "checkpoints" / "latest").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    meta = load_metadata(cfg.data)
    ids = training_ids(meta, cfg.partition)
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
            budget=budget, randomness=randomness, ema=ema,
            progress=progress, description="central", on_log=on_log,
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
