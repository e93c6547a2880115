"""The `federation` section of the config: rounds, strategy, sites, update checks and secure aggregation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 3
    local_steps: int = 10
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam
    proximal_mu: float = 0.01
    server_lr: float = 1e-2  # fedadam
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    min_sites: int = 2
    fraction_train: float = 1.0
    sample_every: int = 1  # write a sample PNG from the global model every K rounds (0: never)
    evaluate_every: int = 0  # fidelity of the global model on a small batch every K rounds (0: never)
    num_cpus_per_site: float = 1.0
    init_from: str | None = None  # a `fedecg pretrain` run: the public base model the federation starts from
    local_lr: float | None = None  # the sites' learning rate (None: train.lr); fine-tuning a base wants less
    trainable: tuple[str, ...] = ()  # parameter-name prefixes the sites train, the rest frozen (empty: all)
    site_state_dir: str = ".fedecg/sites"  # each site's ledger, secret key and local logs (node_config state-dir wins)
    # Update checks (server/update_checks.py). Quickstart's site updates measure ||site - global||_2 ~1.4 (README).
    max_update_norm: float = 100.0
    # SecAgg+ (server/secure_aggregation.py): the server learns only the weighted sum of the sites' updates.
    secure_aggregation: bool = False
    secagg_num_shares: int = 3  # each site's mask secrets are split among itself and 2 neighbours
    secagg_reconstruction_threshold: int = 2  # shares that rebuild a secret: one dropout is survived
    secagg_clipping_range: float = 1.0  # bound on each coordinate of an update; quickstart's measure ~0.005
    secagg_quantization_range: int = 2**22  # levels over [-c, c]; sums of fewer than 1024 sites fit in 2**32

    def problems(self) -> list[str]:
        """What makes this section unusable; common.config raises them as a ConfigError naming the file."""
        checks = {
            f"max_update_norm must be > 0 (got {self.max_update_norm})": self.max_update_norm > 0,
            f"secagg_num_shares must be at least 3, as SecAgg+ needs (got {self.secagg_num_shares})":
                self.secagg_num_shares >= 3,
            f"secagg_reconstruction_threshold must lie in [2, secagg_num_shares) (got "
            f"{self.secagg_reconstruction_threshold} with {self.secagg_num_shares} shares)":
                2 <= self.secagg_reconstruction_threshold < self.secagg_num_shares,
            f"secagg_clipping_range must be > 0 (got {self.secagg_clipping_range})": self.secagg_clipping_range > 0,
            f"secagg_quantization_range must lie in [2, 2**31] (got {self.secagg_quantization_range})":
                2 <= self.secagg_quantization_range <= 2**31,
            f"secure_aggregation needs min_sites >= 2 (got {self.min_sites})":
                self.min_sites >= 2 or not self.secure_aggregation,
        }
        return [message for message, ok in checks.items() if not ok]
