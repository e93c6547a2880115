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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common.bundle import RHYTHM_JSON, WEIGHTS, load_weights, save_checkpoint, save_weights
from common.config import Config, config_hash, to_dict
from common.config import save as save_config
from common.data.dataset import load_dataset
from common.data.metadata import load_metadata
from common.data.partition import make_partition, training_ids
from common.data.patient_choice import one_record_per_patient
from common.diffusion import GaussianDiffusion
from common.expert import expert_provenance
from common.generate import generate, grid_conditions
from common.hashing import sha256_file
from common.model.denoiser import build_denoiser, count_parameters
from common.normalization import federated_normalizer
from common.plotting import plot_curves, plot_ecg_grid
from common.privacy import (
    DPRandomness,
    SiteBudget,
    SiteLedger,
    build_certificate,
    plan_budget,
    write_certificate,
)
from common.rhythm import RhythmTable, record_beats, require_public_pool
from common.run_dir import latest_pointer, write_latest
from common.scp import SCP_CODES
from common.train import EMA, TrainingData, TrainResult, train_local

log = logging.getLogger("fedecg.central")


BASE_FORMAT = "fedecg-public-base/1"
RESUME = "resume"  # the latest training state of an unfinished run: raw and EMA weights, optimizer moments
METRICS = ["step", "loss", "eps_loss", "mel_loss", "seconds"]


@dataclasses.dataclass
class ResumeState:
    step: int
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    ema_updates: int
    optimizer: dict


def write_resume_state(run_dir: Path, step: int, model, ema: EMA, optimizer: torch.optim.Optimizer) -> None:
    """Swap in a complete new state directory, so a kill at any moment leaves one intact state behind."""
    fresh, current, stale = run_dir / f"{RESUME}.new", run_dir / RESUME, run_dir / f"{RESUME}.old"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    state = optimizer.state_dict()
    save_weights(fresh / "model.safetensors", model.state_dict())
    save_weights(fresh / "ema.safetensors", ema.shadow)
    save_weights(fresh / "optimizer.safetensors",
                 {f"{index}/{name}": value for index, moments in state["state"].items() for name, value in moments.items()})
    (fresh / "state.json").write_text(json.dumps({"step": step, "ema_updates": ema.updates,
                                                  "param_groups": state["param_groups"]}))
    if current.exists():
        os.replace(current, stale)
    os.replace(fresh, current)
    shutil.rmtree(stale, ignore_errors=True)


def read_resume_state(run_dir: Path) -> ResumeState | None:
    for directory in (run_dir / RESUME, run_dir / f"{RESUME}.old"):  # .old: killed between the two renames
        if (directory / "state.json").is_file():
            meta = json.loads((directory / "state.json").read_text())
            moments: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in load_weights(directory / "optimizer.safetensors").items():
                index, name = key.split("/")
                moments.setdefault(int(index), {})[name] = value
            return ResumeState(
                step=int(meta["step"]),
                weights=load_weights(directory / "model.safetensors"),
                ema=load_weights(directory / "ema.safetensors"),
                ema_updates=int(meta["ema_updates"]),
                optimizer={"state": moments, "param_groups": meta["param_groups"]},
            )
    return None


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return [row for row in rows if row["step"] <= up_to_step]


@dataclasses.dataclass
class _Plan:
    """How far this run trains, from where, and under which DP budget (None: not private)."""

    steps: int
    resumed: bool = False
    start_step: int = 0
    optimizer_state: dict | None = None
    budget: SiteBudget | None = None
    randomness: DPRandomness | None = None


def run_central(cfg: Config, run_dir: Path, progress: bool = True, pool: str = "training", resume: bool = False) -> Path:
    """Train on `pool` into `run_dir`: metrics, checkpoints, curves and samples; a certificate under DP."""
    resumed = _check_run_dir(run_dir, resume)
    if pool != "public":
        require_public_pool(cfg.model.rhythm, f"central training on the {pool} pool")
    cfg, ids = _pool_ids(cfg, pool)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    dataset = _load_records(cfg, ids, progress)
    # Public constants, as at the sites: statistics fitted on private records would be an unaccounted release.
    normalizer = federated_normalizer()
    # Checked before any step: the sample grids use it, and under DP the certificate names it.
    public_expert = expert_provenance(cfg, normalizer)
    # R peaks once, for the beat maps and, a function of the public pool alone (checked above), the table
    # sampling draws beat times from.
    beats = record_beats(dataset.signals, cfg.data.sampling_rate) if cfg.model.rhythm else None
    data = TrainingData.from_dataset(dataset, normalizer, beats)
    rhythm = None if beats is None else RhythmTable.from_beats(beats, dataset.labels, cfg.data.sampling_rate)
    torch.manual_seed(cfg.train.seed)
    model = build_denoiser(cfg.model)
    ema = EMA(model, cfg.train.ema_decay)
    print(f"central training: {len(dataset)} records, model '{cfg.model.size}' with {count_parameters(model):,} parameters")
    plan = _restore(cfg, model, ema, resumed)
    if cfg.train.sample_every % max(1, cfg.train.log_every):
        raise ValueError(f"train.sample_every ({cfg.train.sample_every}) must be a multiple of train.log_every "
                         f"({cfg.train.log_every})")
    if cfg.privacy.enabled:
        plan.budget, plan.steps, plan.randomness = _reserve_budget(cfg, run_dir, dataset)

    start = time.perf_counter()
    result, rows = _train(cfg, run_dir, model, ema, data, normalizer, plan,
                          "pretrain" if pool == "public" else "central", progress, rhythm)
    ema.copy_to(model)  # an average of DP iterates is post-processing: it costs no privacy
    directory = _write_results(cfg, run_dir, model, normalizer, result.steps, plan.budget, pool, dataset, rows,
                               public_expert, rhythm)
    _plot_samples(cfg, model.state_dict(), normalizer, directory, run_dir / "samples.png", progress, rhythm)
    print(
        f"trained {result.steps} steps in {time.perf_counter() - start:.1f}s "
        f"(final loss {result.loss:.4f}, mel {result.mel_loss:.4f})\nrun directory: {run_dir}"
    )
    return run_dir


def _check_run_dir(run_dir: Path, resume: bool) -> ResumeState | None:
    """A finished run is never overwritten, an unfinished one only continued; the state to resume from."""
    if latest_pointer(run_dir).exists():
        raise FileExistsError(f"{run_dir} already holds a finished run; choose a new --out")
    resumed = read_resume_state(run_dir) if resume else None
    if resume and resumed is None:
        raise FileNotFoundError(f"--resume {run_dir}: no resume state there (it is written every train.log_every steps)")
    if not resume and (run_dir / RESUME).exists():
        raise FileExistsError(f"{run_dir} holds an unfinished run; continue it with --resume {run_dir}")
    return resumed


def _pool_ids(cfg: Config, pool: str) -> tuple[Config, list[int]]:
    """The records of `pool`, and the config to train them with (the public pool is never trained with DP)."""
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
    return cfg, ids


def _load_records(cfg: Config, ids: list[int], progress: bool):
    """The pool's records; under DP with privacy.unit=patient, one record per patient."""
    dataset = load_dataset(cfg.data, ecg_ids=ids, progress=progress)
    if cfg.privacy.enabled and cfg.privacy.unit == "patient":
        dataset = dataset.subset(one_record_per_patient(dataset.ecg_ids, dataset.patient_ids, cfg.partition.seed))
    return dataset


def _restore(cfg: Config, model, ema: EMA, resumed: ResumeState | None) -> _Plan:
    """The plan of a fresh run, or the weights, EMA and optimizer moments of the one being resumed."""
    plan = _Plan(steps=cfg.train.steps, resumed=resumed is not None)
    if resumed is not None:
        if cfg.privacy.enabled:
            raise ValueError("resuming a DP central run is not supported: start it again with a fresh --out")
        plan.start_step, plan.optimizer_state = resumed.step, resumed.optimizer
        model.load_state_dict(resumed.weights)
        ema.shadow, ema.updates = resumed.ema, resumed.ema_updates
        print(f"resuming at step {plan.start_step} of {plan.steps}")
    return plan


def _reserve_budget(cfg: Config, run_dir: Path, dataset) -> tuple[SiteBudget, int, DPRandomness]:
    """The run's budget, the steps it affords (reserved in the central ledger first) and secret randomness."""
    ledger = SiteLedger.open(cfg.federation.site_state_dir, "central", dataset.ecg_ids)
    run_key = f"central:{run_dir.resolve()}"
    with ledger.locked():
        budget = ledger.budget(run_key, lambda: plan_budget(
            "central", cfg.privacy, cfg.train.batch_size, len(dataset), cfg.train.steps))
        steps = ledger.reserve(run_key, budget, cfg.train.steps)
        randomness = ledger.next_randomness()
    print(f"DP-SGD: sigma={budget.noise_multiplier:.4f}, q={budget.sample_rate:.5f}, C={budget.max_grad_norm}, "
          f"ledger {ledger.directory}")
    return budget, steps, randomness


def _train(cfg: Config, run_dir: Path, model, ema: EMA, data: TrainingData, normalizer, plan: _Plan,
           description: str, progress: bool, rhythm: RhythmTable | None) -> tuple[TrainResult, list[dict[str, float]]]:
    """train_local, writing metrics.csv, the resume state and the snapshots as it goes; the result and log rows."""
    rows = _read_metrics(run_dir / "metrics.csv", up_to_step=plan.start_step) if plan.resumed else []
    elapsed = rows[-1]["seconds"] if rows else 0.0
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(rows)

        def on_log(row: dict[str, float], optimizer: torch.optim.Optimizer) -> None:
            row = {**row, "seconds": elapsed + row["seconds"]}  # training seconds since the run began
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            step = int(row["step"])
            if step < plan.steps and plan.budget is None:
                write_resume_state(run_dir, step, model, ema, optimizer)
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < plan.steps:
                _write_snapshot(run_dir, cfg, model, ema, normalizer, step, progress, rhythm)

        result = train_local(
            model, GaussianDiffusion(cfg.diffusion), data, cfg, plan.steps,
            budget=plan.budget, randomness=plan.randomness, ema=ema, schedule=True,
            progress=progress, description=description, on_log=on_log,
            start_step=plan.start_step, optimizer_state=plan.optimizer_state,
        )
    return result, rows


def _write_results(cfg: Config, run_dir: Path, model, normalizer, steps: int, budget: SiteBudget | None, pool: str,
                   dataset, rows: list[dict[str, float]], public_expert: dict | None,
                   rhythm: RhythmTable | None) -> Path:
    """The final checkpoint (the run is then finished), its certificate or base record, and the loss curves."""
    directory = save_checkpoint(
        run_dir / "checkpoints" / "final",
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        cfg,
        normalizer,
        progress={"step": steps, "kind": "central", "weights": "ema"},
        rhythm=rhythm,
    )
    write_latest(run_dir, directory.name)
    shutil.rmtree(run_dir / RESUME, ignore_errors=True)  # finished: nothing left to resume
    if budget is not None:
        write_certificate(run_dir / "privacy.json",
                          build_certificate(cfg, [budget], "central", sha256_file(directory / WEIGHTS),
                                            public_expert=public_expert))
    if pool == "public":
        _write_base(run_dir, cfg, dataset, directory, steps)
    if rows:
        plot_curves(rows, "step", ["loss", "eps_loss", "mel_loss"], run_dir / "curves.png", "central training")
    return directory


def _write_snapshot(run_dir: Path, cfg: Config, model, ema: EMA, normalizer, step: int, progress: bool,
                    rhythm: RhythmTable | None) -> None:
    """The EMA weights at `step` as a checkpoint, and their sample grid: quality along the run."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state.update({k: v.detach().cpu().clone() for k, v in ema.shadow.items()})
    directory = save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", state, cfg, normalizer,
                                progress={"step": step, "kind": "central", "weights": "ema"}, rhythm=rhythm)
    _plot_samples(cfg, state, normalizer, directory, run_dir / f"samples-step-{step:06d}.png", False, rhythm)


def _plot_samples(cfg: Config, state: dict, normalizer, directory: Path, path: Path, progress: bool,
                  rhythm: RhythmTable | None) -> None:
    """A grid of samples from the weights `state` (saved at `directory`), one per grid condition."""
    from common.bundle import build_generator

    gen = build_generator(cfg, state, normalizer, directory, rhythm=rhythm)
    labels, demo, mask, titles = grid_conditions(SCP_CODES, cfg.train.num_samples)
    signals = generate(gen, labels, demo, mask, seed=cfg.train.seed, progress=progress)
    plot_ecg_grid(signals, path, titles=titles)


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
        **({"rhythm_sha256": sha256_file(checkpoint / RHYTHM_JSON)} if cfg.model.rhythm else {}),
        "partition": to_dict(cfg)["partition"],
        "model": to_dict(cfg)["model"],
        "diffusion": to_dict(cfg)["diffusion"],
    }
    (run_dir / "base.json").write_text(json.dumps(base, indent=2))
