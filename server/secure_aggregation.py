"""Secure aggregation (SecAgg+): the server learns only the weighted sum of the sites' updates.

A round under `federation.secure_aggregation` has two parts:

1. A plain train message, as in every round: the sites train, send their public numbers (declared N,
   privacy budget) in the clear and keep their update (site - global) at the site.
2. Flower's SecAggPlusWorkflow over the sites that hold an update. Its stage "collect masked vectors"
   asks each site's ClientApp (behind flwr's secaggplus_mod) for the held update as a legacy FitRes
   weighted by the declared N; the mod scales, quantizes and masks it, and the server unmasks only the
   weighted mean. Updates, not weights, go through the channel: they are ~1e-3 per coordinate, so a
   small clipping range keeps the quantization error far below them.

The workflow drives a legacy Strategy through LegacyContext; `_HeldUpdates` is the two calls it makes
(configure_fit, aggregate_fit), nothing more. max_weight is the largest declared N of the round (public,
from part 1), so every site's weight ratio is at most 1 and the largest site's is exactly 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config_federation import FederationConfig

log = logging.getLogger("fedecg.server")
MODULUS_RANGE = 2**32  # Flower's default and its maximum: masks and sums live in Z_{2^32}


@dataclass(frozen=True)
class _Node:
    """What the workflow needs of a legacy ClientProxy: its node id."""

    node_id: int


@dataclass
class SecureSum:
    """The unmasked weighted mean of the held updates, in the order of the global model's arrays."""

    mean: list[np.ndarray] | None = None
    summed_nodes: set[int] = field(default_factory=set)  # the sites whose masked update made it into the sum


class _HeldUpdates:
    """The legacy-Strategy face SecAggPlusWorkflow calls: which nodes take part, and where the sum lands."""

    def __init__(self, server_round: int, nodes: list[int]) -> None:
        self.server_round = server_round
        self.nodes = nodes
        self.outcome = SecureSum()

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list[tuple[_Node, FitIns]]:
        # The sites already hold their updates: no weights travel, only the round they are asked for.
        return [(_Node(node), FitIns(Parameters(tensors=[], tensor_type=""), {"server-round": server_round}))
                for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[_Node, FitRes]], failures: list) -> tuple[None, dict]:
        if results:
            self.outcome = SecureSum(parameters_to_ndarrays(results[0][1].parameters), {p.node_id for p, _ in results})
        return None, {}  # the server applies the mean itself (server_app._secure_round)


def secure_mean(grid: Grid, server_round: int, weights: dict[int, int], fc: FederationConfig,
                timeout: float) -> SecureSum:
    """Run SecAgg+ over the nodes in `weights` (node id -> declared N); the weighted mean of their held updates."""
    if len(weights) * fc.secagg_quantization_range >= MODULUS_RANGE:
        raise ValueError(f"{len(weights)} sites x secagg_quantization_range {fc.secagg_quantization_range} overflow "
                         f"SecAgg+'s modulus 2**32: lower federation.secagg_quantization_range")
    held = _HeldUpdates(server_round, sorted(weights))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=held)  # duck-typed: the workflow calls configure_fit and aggregate_fit only
    context.state["config"] = ConfigRecord({"current_round": server_round})
    context.state["parameters"] = ArrayRecord()
    SecAggPlusWorkflow(
        num_shares=fc.secagg_num_shares,
        reconstruction_threshold=fc.secagg_reconstruction_threshold,
        max_weight=float(max(weights.values())),
        clipping_range=fc.secagg_clipping_range,
        quantization_range=fc.secagg_quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )(grid, context)
    if held.outcome.mean is None:
        raise RuntimeError(f"round {server_round}: secure aggregation halted before unmasking (fewer sites answered "
                           f"than federation.secagg_reconstruction_threshold={fc.secagg_reconstruction_threshold} "
                           "needs); the server learned no sum")
    return held.outcome


def quantization_bound(fc: FederationConfig, sites: int) -> float:
    """Worst-case error of one coordinate of the secure mean: one quantum per site (stochastic rounding),
    over a total weight ratio of at least 1 (the largest site's)."""
    return sites * 2.0 * fc.secagg_clipping_range / fc.secagg_quantization_range
