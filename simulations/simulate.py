"""`fedecg simulate`: the whole federation on Flower's simulation engine, one virtual SuperNode per site."""

from __future__ import annotations

import os
from pathlib import Path

from common.config import Config, RunSpec, load


def flower_environment(home: Path) -> dict[str, str]:
    """Keep Flower and Ray offline, quiet and inside the run: no telemetry, no update check, no pip at run time."""
    home.mkdir(parents=True, exist_ok=True)
    ray_tmp = Path("/tmp") / f"fedecg-ray-{os.getuid()}"
    ray_tmp.mkdir(parents=True, exist_ok=True)
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(home),
        # Ray's socket paths must stay short (107 bytes), so its temp dir sits under /tmp, not in the run dir.
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def simulate(spec: RunSpec) -> Path:
    """Run (or resume) a federated simulation; returns the run directory."""
    from flwr.simulation import run_simulation

    from client.client_app import build_client_app
    from common.data.partition import count_sites
    from server.server_app import build_server_app

    cfg = load(spec.config_path, spec.overrides)
    num_sites = count_sites(cfg)
    os.environ.update(flower_environment(Path(spec.run_dir) / ".flwr"))
    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.num_cpus_per_site, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1},
    }
    if _use_gpu(cfg):
        backend_config["client_resources"]["num_gpus"] = 1.0 / num_sites
    failure: list[BaseException] = []
    server_app = build_server_app(spec, failures=failure)
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(spec),
        num_supernodes=num_sites,
        backend_config=backend_config,
    )
    if failure:
        raise RuntimeError(f"the federated run failed: {failure[0]}") from failure[0]
    return Path(spec.run_dir)


def _use_gpu(cfg: Config) -> bool:
    if cfg.train.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()
