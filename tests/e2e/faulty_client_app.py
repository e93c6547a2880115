"""The fault tests' ClientApp: the product's handlers, plus faults a test plans for chosen (site, round)s.

Only tests/e2e/test_deployment_faults.py uses it, by staging a copy of the app whose pyproject names
`tests.e2e.faulty_client_app:app` as the ClientApp; the product's ClientApp has no fault switch. The plan
is a JSON file named by $FEDECG_FAULT_PLAN (the test sets it before starting the SuperNodes, whose
ClientApp processes inherit it): {"control": DIR, "faults": {"SITE/ROUND": FAULT}} with FAULT one of

    hang    train the round for real (the steps are reserved in the site's ledger first, as always), then
            write DIR/training-SITE-ROUND and sleep before the update leaves: the test kills the SuperNode
    wait    before training, write DIR/waiting-SITE-ROUND and wait until DIR/go-SITE-ROUND exists (lets the
            test order events across sites: the round's messages are out, and it ends only when told)
    nan     the real update with NaN in its first array
    shape   the real update with an extra row in its first array
    norm    the real update plus 1e3 on every weight (an absurd norm)

A hostile site trains for real first, so its spend is genuine and must be counted though its update is rejected.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

import client.site as site_module
from client.client_app import handle_audit, handle_memorization, handle_train, secure_aggregation_mod
from common.config import RunSpec

PLAN_ENV = "FEDECG_FAULT_PLAN"


def _plan() -> tuple[Path, dict[str, str]]:
    plan = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    return Path(plan["control"]), dict(plan["faults"])


def _spec(context: Context) -> RunSpec:
    return RunSpec.from_run_config(dict(context.run_config))


def _hang_after_training(control: Path, site: int, server_round: int) -> None:
    real = site_module.train_local

    def train_then_hang(*args, **kwargs):
        result = real(*args, **kwargs)
        (control / f"training-{site}-{server_round}").write_text(str(os.getpid()))
        time.sleep(600)  # killed here: the steps were taken, the update never leaves
        return result

    site_module.train_local = train_then_hang  # train_round looks it up at call time


def _corrupt(arrays: ArrayRecord, fault: str) -> ArrayRecord:
    state = {name: array.numpy().copy() for name, array in arrays.items()}
    first = next(name for name, values in state.items() if values.ndim >= 1)
    if fault == "nan":
        state[first].reshape(-1)[0] = np.nan
    elif fault == "shape":
        values = state[first]
        state[first] = np.concatenate([values, values[:1]], axis=0)
    elif fault == "norm":
        state = {name: values + np.asarray(1e3, dtype=values.dtype) for name, values in state.items()}
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return ArrayRecord({name: Array(values) for name, values in state.items()})


app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    control, faults = _plan()
    site = int(context.node_config["site"])
    server_round = int(msg.content["config"]["server-round"])
    fault = faults.get(f"{site}/{server_round}")
    if fault == "hang":
        _hang_after_training(control, site, server_round)
    elif fault == "wait":
        (control / f"waiting-{site}-{server_round}").write_text(str(os.getpid()))
        go = control / f"go-{site}-{server_round}"
        deadline = time.monotonic() + 300
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    reply = handle_train(msg, context, _spec(context))
    if fault in ("nan", "shape", "norm"):
        reply.content["arrays"] = _corrupt(reply.content["arrays"], fault)
    return reply


@app.evaluate("memorization")
def memorization(msg: Message, context: Context) -> Message:
    return handle_memorization(msg, context, _spec(context))


@app.evaluate("audit")
def audit(msg: Message, context: Context) -> Message:
    return handle_audit(msg, context, _spec(context))
