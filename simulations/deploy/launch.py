"""What the two loopback modes share before and while their processes run: the staged inputs and a mode's launch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import Config
from simulations.deploy.supervisor import Supervisor


@dataclass(frozen=True)
class StagedRun:
    """Everything both modes need before a process starts; Flower's processes read only absolute paths."""

    config_path: Path
    overrides: list[str]  # with absolute data and cache locations appended
    cfg: Config
    data_root: Path
    num_sites: int
    run_dir: Path
    app: Path  # the staged copy of the Flower app
    run_config: Path  # the --run-config TOML file


@dataclass
class Launch:
    """What one mode adds to the skeleton in `_run`."""

    mode: str  # FlowerRunResult.mode
    supervisor: Supervisor
    connection: str  # the flwr CLI connection that `flwr ls` asks
    superlink: str  # host:port, for FlowerRunResult.superlink
    start: Callable[[], None]  # starts every process, `flwr run --stream` (named flwr-run) last
    watched: list[str]  # processes whose death ends the run early
    log_label: str  # how the flwr-run log is named in an error
    poll: Callable[[], None] = lambda: None  # adopts processes started outside our process tree
    close: Callable[[], None] = lambda: None  # releases what the mode made, once everything is stopped
    security: str = "none"  # FlowerRunResult.security

