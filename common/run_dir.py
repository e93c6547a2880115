"""A run directory's layout: its default name, and checkpoints/latest, the pointer to its current checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

from common.config import Config

CHECKPOINTS = "checkpoints"


def default_run_dir(cfg: Config, kind: str | None = None) -> Path:
    """output.dir/output.name[-KIND]-YYYYmmdd-HHMMSS: a new name per start, sortable by time."""
    name = cfg.output.name if kind is None else f"{cfg.output.name}-{kind}"
    return Path(cfg.output.dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_pointer(run_dir: str | Path) -> Path:
    """The file naming the current checkpoint's folder under checkpoints/; it exists once one is complete."""
    return Path(run_dir) / CHECKPOINTS / "latest"


def read_latest(run_dir: str | Path) -> str | None:
    """The current checkpoint's folder name, None before the first checkpoint."""
    pointer = latest_pointer(run_dir)
    return pointer.read_text().strip() if pointer.is_file() else None


def write_latest(run_dir: str | Path, name: str) -> None:
    """Point at checkpoints/NAME; callers write it last, so a crash mid-checkpoint leaves the previous one current."""
    latest_pointer(run_dir).write_text(name)
