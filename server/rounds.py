"""One training round, plain or under SecAgg+: send the global model, record every site's spend, check, aggregate.

Plain: every site's weights are checked (server/update_checks.py); a failing site is left out of the round
(`rejected: reason` in its metrics row) and the others are aggregated if `min_sites` still holds. Its privacy
spend is recorded in the ledger all the same: it trained. Under SecAgg+ (server/secure_aggregation.py) the
server never sees one update: each site checks its own before masking it, and the server checks the aggregate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.config_federation import FederationConfig
from server.secure_aggregation import quantization_bound, secure_mean
from server.strategy import LedgerConflict, PrivacyLedger
from server.update_checks import Rejection, check_update, check_values

log = logging.getLogger("fedecg.server")
ROUND_TIMEOUT_S = 3600.0


class RoundFailed(RuntimeError):
    """A round that cannot be aggregated; `rows` (each site's metrics, rejections included) are kept for the record."""

    def __init__(self, message: str, rows: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass
class Round:
    arrays: ArrayRecord | None  # the new global model; None when no site could train (budgets spent)
    rows: list[dict]  # one metrics row per site that answered


def play_round(grid: Grid, strategy, server_round: int, arrays: ArrayRecord, run_key: str, fc: FederationConfig,
               ledger: PrivacyLedger) -> Round:
    play = _secure_round if fc.secure_aggregation else _plain_round
    return play(grid, strategy, server_round, arrays, run_key, fc, ledger)


def site_name(message: Message) -> str:
    return str(message.content["site"]["name"])


def _plain_round(grid: Grid, strategy, server_round: int, arrays: ArrayRecord, run_key: str, fc: FederationConfig,
                 ledger: PrivacyLedger) -> Round:
    ok = _send_train(grid, strategy, server_round, arrays, run_key, fc)
    rows = [_record_reply(m, ledger, server_round) for m in ok]
    training, rejected = _screen(server_round, ok, rows, arrays, fc.max_update_norm)
    _require_enough(server_round, len(ok), len(training), rejected, rows, fc.min_sites)
    if not training:
        return Round(None, rows)
    aggregated, _ = strategy.aggregate_train(server_round, training)
    return Round(aggregated, rows)


def _secure_round(grid: Grid, strategy, server_round: int, arrays: ArrayRecord, run_key: str, fc: FederationConfig,
                  ledger: PrivacyLedger) -> Round:
    ok = _send_train(grid, strategy, server_round, arrays, run_key, fc)
    rows = [_record_reply(m, ledger, server_round) for m in ok]
    held, rejected = {}, 0
    for message, row in zip(ok, rows):
        node = message.metadata.src_node_id
        if "update-refused" in message.content:  # the site's own check (client_app.hold_update) failed
            refused = message.content["update-refused"]
            _reject(server_round, row, node, Rejection(str(refused["check"]), f"{refused['reason']} (checked at the site)"))
            rejected += 1
        elif "update-held" in message.content:
            held[node] = int(row["num-records"])
    _require_enough(server_round, len(ok), len(held), rejected, rows, fc.min_sites)
    if not held:
        return Round(None, rows)
    try:
        result = secure_mean(grid, server_round, held, fc, ROUND_TIMEOUT_S)
    except (RuntimeError, ValueError) as err:  # halted or unusable: no sum, but the spends above are on record
        raise RoundFailed(str(err), rows) from err
    for message, row in zip(ok, rows):
        node = message.metadata.src_node_id
        if node in held and node not in result.summed_nodes:
            _reject(server_round, row, node, Rejection("secure-aggregation", "dropped out before its masked update was summed"))
            rejected += 1
    _require_enough(server_round, len(ok), len(result.summed_nodes), rejected, rows, fc.min_sites)
    mean = _apply_mean(server_round, arrays, result.mean, fc.max_update_norm, rows)
    log.info("round %d: secure mean of %d sites (quantization error at most %.2g per coordinate)", server_round,
             len(result.summed_nodes), quantization_bound(fc, len(result.summed_nodes)))
    total = sum(held[node] for node in result.summed_nodes)
    reply = Message(RecordDict({"arrays": mean, "metrics": MetricRecord({"num-records": total})}),
                    dst_node_id=0, message_type=MessageType.TRAIN)
    aggregated, _ = strategy.aggregate_train(server_round, [reply])  # the strategy steps from the one mean it sees
    return Round(aggregated, rows)


def _apply_mean(server_round: int, arrays: ArrayRecord, delta: list[np.ndarray], max_update_norm: float,
                rows: list[dict]) -> ArrayRecord:
    """Global + the secure mean of the updates, after the checks a single update gets in the plain path."""
    reference = {name: array.numpy() for name, array in arrays.items()}
    shapes = [tuple(d.shape) for d in delta]
    rejection = None
    if shapes != [tuple(ref.shape) for ref in reference.values()]:
        rejection = Rejection("shape", f"the secure sum holds {len(delta)} arrays that do not match the global model's")
    else:
        candidate = {name: (ref + d).astype(ref.dtype) for (name, ref), d in zip(reference.items(), delta)}
        rejection = check_values(candidate, reference, max_update_norm)
    if rejection is not None:
        rows.append({"round": server_round, "site": "global", "rejected": f"aggregate {rejection}"})
        raise RoundFailed(f"round {server_round}: the secure aggregate fails the {rejection.check} check: "
                          f"{rejection.reason}", rows)
    return ArrayRecord({name: Array(values) for name, values in candidate.items()})


def _send_train(grid: Grid, strategy, server_round: int, arrays: ArrayRecord, run_key: str,
                fc: FederationConfig) -> list[Message]:
    """Send the global weights to the sites Flower's strategy picks; the replies without an error."""
    config = ConfigRecord({"proximal-mu": fc.proximal_mu if fc.strategy == "fedprox" else 0.0, "run-key": run_key,
                           "secure-aggregation": fc.secure_aggregation})
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    replies = list(grid.send_and_receive(messages=messages, timeout=ROUND_TIMEOUT_S))
    # The SuperLink answers for a node that went offline with src_node_id = its own id (1): name the node
    # the message was sent to, found by the id of the message the reply answers.
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for m in replies:
        if m.has_error():
            node = sent_to.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            log.error("round %d: node %d failed: %s", server_round, node, m.error.reason)
    return [m for m in replies if not m.has_error()]


def _require_enough(server_round: int, answered: int, updates: int, rejected: int, rows: list[dict],
                    min_sites: int) -> None:
    """Fail the round when no site answered, or when rejections leave fewer than `min_sites` to aggregate."""
    if not answered:
        raise RoundFailed(f"round {server_round}: no site answered", rows)
    if (updates or rejected) and (answered - rejected < min_sites or not updates):
        raise RoundFailed(f"round {server_round}: {answered} sites answered and {rejected} updates were rejected, "
                          f"fewer than min_sites={min_sites} left to aggregate", rows)


def _screen(server_round: int, replies: list[Message], rows: list[dict], arrays: ArrayRecord,
            max_update_norm: float) -> tuple[list[Message], int]:
    """The replies whose weights pass every check, and how many were rejected."""
    reference = {name: array.numpy() for name, array in arrays.items()}
    accepted, rejected = [], 0
    for message, row in zip(replies, rows):
        if "arrays" not in message.content:
            continue  # budget exhausted: nothing to check or aggregate
        rejection = check_update(message.content["arrays"], arrays, max_update_norm, reference)
        if rejection is None:
            accepted.append(message)
        else:
            _reject(server_round, row, message.metadata.src_node_id, rejection)
            rejected += 1
    return accepted, rejected


def _reject(server_round: int, row: dict, node: int, rejection: Rejection) -> None:
    row["rejected"] = str(rejection)
    log.warning("round %d: rejected the update of site %s (node %d), check %s: %s", server_round, row["site"], node,
                rejection.check, rejection.reason)


def _record_reply(message: Message, ledger: PrivacyLedger, server_round: int) -> dict:
    """One site's reply as a metrics row; its budget goes into the ledger, which refuses conflicts.

    The claimed site name is checked against the reply's authenticated node first (the site registry's
    binding, when the run has one), with or without DP: a conflict fails the run before anything of that
    reply is recorded or aggregated, since the certificate could no longer say whose records were spent.
    """
    name = site_name(message)
    try:
        if "privacy" in message.content:  # update binds the node to the site before it records the budget
            ledger.update(message.metadata.src_node_id, name, str(message.content["privacy"]["budget"]))
        else:
            ledger.bind(message.metadata.src_node_id, name)
    except LedgerConflict as err:
        log.error("round %d: %s; stopping the run", server_round, err)
        raise
    return {"round": server_round, "site": name, **dict(message.content["metrics"])}
