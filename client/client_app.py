"""Flower ClientApp: context -> site data -> common.train -> weights + public numbers.

The site's privacy ledger and secret key live in its state directory (node_config `state-dir`, else
`federation.site_state_dir`), keyed by its records, so they span rounds, restarts and runs.

Under secure aggregation (server/secure_aggregation.py) a train message gets the public numbers back and the
site holds its update (site - global) in its Flower context; Flower's secaggplus_mod then asks for it in the
"collect masked vectors" stage and masks it before it leaves. A site whose config asks for secure aggregation
refuses to send its weights in the clear.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from common.config import Config, RunSpec

# client.site (torch, Opacus, SciPy: seconds to import) is imported where a handler trains or evaluates. In a
# deployment each message starts a new ClientApp process, and three of SecAgg+'s four stages, and the release
# of the held update, need none of it.

log = logging.getLogger("fedecg.client")
HELD = "fedecg.held-update"  # context.state keys: the update awaiting SecAgg+, and its round and declared N
HELD_PLAN = "fedecg.held-plan"


def handle_train(msg: Message, context: Context, spec: RunSpec) -> Message:
    cfg = spec.load()
    if "fitins.config" in msg.content:  # SecAgg+ "collect masked vectors": secaggplus_mod masks what we return
        return release_held_update(msg, context)
    from client.site import load_site, open_ledger, train_round
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    ledger = open_ledger(cfg, site, node_config)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    if "run-key" not in config:
        raise ValueError("the server sent no run-key: it names this run in the site's ledger")
    secure = bool(config.get("secure-aggregation", False))
    if cfg.federation.secure_aggregation and not secure:
        raise ValueError("this run's config sets federation.secure_aggregation, but the server asked for the "
                         "site's weights in the clear; refusing")
    global_state = msg.content["arrays"].to_torch_state_dict()
    state, metrics, budget = train_round(
        cfg, site, ledger, global_state, server_round, str(config["run-key"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)), resend_release=not secure,
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if budget is not None:
        content["privacy"] = ConfigRecord({"budget": budget.to_json()})
    if state is None:
        log.warning("site %s: privacy budget exhausted, no step taken in round %d", site.name, server_round)
    elif secure:
        refused = hold_update(context, cfg, global_state, state, server_round, int(metrics["num-records"]))
        if refused:
            log.warning("site %s: round %d update fails the %s check: %s", site.name, server_round, *refused)
            content["update-refused"] = ConfigRecord({"check": refused[0], "reason": refused[1]})
        else:
            content["update-held"] = ConfigRecord({"round": server_round})
    else:
        content["arrays"] = ArrayRecord(state)
    return Message(content, reply_to=msg)


def hold_update(context: Context, cfg: Config, global_state: dict, state: dict, server_round: int,
                num_records: int) -> tuple[str, str] | None:
    """Keep (site - global) for SecAgg+, or say which check it fails: SecAgg+ would silently clip a coordinate
    beyond the clipping range, and the server cannot check a masked update. The update is the DP output, so
    the reason (a function of it) may leave the site."""
    fc = cfg.federation
    delta = {name: (state[name].double() - global_state[name].double()).numpy() for name in global_state}
    bad = [name for name, d in delta.items() if not np.isfinite(d).all()]
    if bad:
        return "finite", f"{bad[0]} holds NaN/inf values"
    norm = float(np.sqrt(sum(np.square(d).sum() for d in delta.values())))
    peak = max(float(np.abs(d).max()) for d in delta.values())
    if norm > fc.max_update_norm:
        return "norm", f"||update - global||_2 = {norm:.4g} exceeds federation.max_update_norm = {fc.max_update_norm:g}"
    if peak > fc.secagg_clipping_range:
        return "clipping-range", (f"max |update| = {peak:.4g} exceeds federation.secagg_clipping_range = "
                                  f"{fc.secagg_clipping_range:g}")
    context.state[HELD] = ArrayRecord([d.astype(np.float32) for d in delta.values()])  # the global model's order
    context.state[HELD_PLAN] = ConfigRecord({"round": server_round, "num-records": num_records})
    return None


def release_held_update(msg: Message, context: Context) -> Message:
    """The held update as the legacy FitRes that secaggplus_mod masks, weighted by the declared N."""
    server_round = int(msg.content["fitins.config"]["server-round"])
    plan = context.state.get(HELD_PLAN)
    if HELD not in context.state or plan is None or int(plan["round"]) != server_round:
        held = f"round {int(plan['round'])}" if plan is not None else "none"
        raise ValueError(f"secure aggregation asked for the update of round {server_round}; this site holds {held}")
    update = [array.numpy() for array in context.state[HELD].values()]
    del context.state[HELD], context.state[HELD_PLAN]  # sent once: a replayed request finds nothing
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(plan["num-records"]), {})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """SecAgg+ stages (they carry its config record) go through Flower's secaggplus_mod; the rest pass."""
    if RECORD_KEY_CONFIGS in msg.content:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def handle_memorization(msg: Message, context: Context, spec: RunSpec) -> Message:
    """The check runs on the site's records and its report stays there; the server learns that it ran."""
    from client.site import evaluate_memorization, load_site, open_ledger

    cfg = spec.load()
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    path = evaluate_memorization(cfg, site, open_ledger(cfg, site, node_config), msg.content["arrays"].to_torch_state_dict())
    log.info("site %s: memorization report written to %s", site.name, path)
    content = RecordDict({"metrics": MetricRecord({"site-index": site.index, "memorization-checked": 1}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)


def handle_audit(msg: Message, context: Context, spec: RunSpec) -> Message:
    """Score this site's canaries under the final weights; only the audit's summary is sent back."""
    from client.site import audit_site, load_site, open_ledger

    cfg = spec.load()
    node_config = dict(context.node_config)
    site = load_site(cfg, node_config)
    summary = audit_site(cfg, site, open_ledger(cfg, site, node_config), msg.content["arrays"].to_torch_state_dict(),
                         str(msg.content["config"]["run-key"]))
    content = RecordDict({"metrics": MetricRecord({"site-index": site.index, **summary}),
                          "site": ConfigRecord({"name": site.name})})
    return Message(content, reply_to=msg)


def build_client_app(spec: RunSpec | None = None) -> ClientApp:
    """A ClientApp bound to `spec`, or (for `flwr run`) reading it from the run config."""
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    @app.evaluate("memorization")
    def memorization(msg: Message, context: Context) -> Message:
        return handle_memorization(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    @app.evaluate("audit")
    def audit(msg: Message, context: Context) -> Message:
        return handle_audit(msg, context, spec or RunSpec.from_run_config(dict(context.run_config)))

    return app


app = build_client_app()
