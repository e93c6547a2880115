"""Tiny run configs for tests: the `tiny` model, a handful of steps, a PTB-XL root of the test's choosing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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
