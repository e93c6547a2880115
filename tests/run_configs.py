"""Tiny run configs for tests: the `tiny` model, a handful of steps, a PTB-XL root of the test's choosing; and
public pretraining runs written without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from common.bundle import RHYTHM_JSON, WEIGHTS, save_checkpoint
from common.config import Config, config_hash, to_dict
from common.hashing import sha256_file
from common.model.denoiser import build_denoiser
from common.normalization import federated_normalizer
from common.rhythm import RhythmTable
from common.run_dir import CHECKPOINTS, write_latest


def tiny_run_config(root: Path, directory: Path, **sections: dict[str, Any]) -> Path:
    """Write a config for `root` into `directory` and return its path; `sections` update the defaults."""
    cfg: dict[str, dict[str, Any]] = {
        "data": {"root": str(root), "cache_dir": str(directory / "cache")},
        "partition": {"scheme": "iid", "num_sites": 2, "seed": 0, "train_folds": [1, 2, 3, 4, 5, 6, 7, 8],
                      "val_folds": [9], "test_folds": [10], "local_val_fraction": 0.1},
        "model": {"size": "tiny"},
        "diffusion": {"timesteps": 50, "sample_steps": 4},
        "midt": {"enabled": True},
        "train": {"batch_size": 4, "steps": 3, "lr": 1e-3, "log_every": 1, "num_samples": 2, "device": "cpu"},
        "privacy": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5},
        "federation": {"rounds": 2, "local_steps": 2, "min_sites": 2, "sample_every": 0, "num_cpus_per_site": 1.0,
                       "site_state_dir": str(directory / "sites")},
        "output": {"dir": str(directory / "runs")},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = directory / "config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_public_run(run: Path, cfg: Config, seed: int = 0, rhythm: RhythmTable | None = None) -> Path:
    """A `fedecg pretrain` run as it leaves its directory: a final checkpoint and base.json describing it
    (a rhythm-conditioned model's with its rhythm table)."""
    torch.manual_seed(seed)
    state = {k: v.detach() for k, v in build_denoiser(cfg.model).state_dict().items()}
    checkpoint = save_checkpoint(run / CHECKPOINTS / "final", state, cfg, federated_normalizer(), {"step": 5},
                                 rhythm=rhythm)
    write_latest(run, "final")
    plain = to_dict(cfg)
    (run / "base.json").write_text(json.dumps({
        "format": "fedecg-public-base/1", "trained_on": "PTB-XL sites [0], declared public; without DP",
        "records": 10, "patients": 9, "steps": 5, "weights_sha256": sha256_file(checkpoint / WEIGHTS),
        "config_sha256": config_hash(cfg), "partition": plain["partition"], "model": plain["model"],
        **({"rhythm_sha256": sha256_file(checkpoint / RHYTHM_JSON)} if rhythm is not None else {}),
        "diffusion": plain["diffusion"]}))
    return run
