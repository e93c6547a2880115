"""Rounds on Flower's simulation engine: a site that sends NaN is left out, and SecAgg+ gives the plain run's weights."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.client_app import handle_train
from common.bundle import initial_state, load_weights
from common.config import RunSpec, load
from server.secure_aggregation import quantization_bound
from server.server_app import build_server_app
from simulations.simulate import flower_environment, simulate
from tests.run_configs import tiny_run_config

pytestmark = pytest.mark.slow

SITES = 3


def _config(template, directory, **federation):
    return tiny_run_config(template.root, directory, partition={"num_sites": SITES},
                           federation={"rounds": 1, "min_sites": 2, **federation}, evaluation={"site_records": 0})


def _nan_at(partition_id: int, spec: RunSpec) -> ClientApp:
    """The real train handler, except that one site's reply carries a NaN (a broken or hostile site)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context, spec)
        if int(context.node_config["partition-id"]) == partition_id:
            state = reply.content["arrays"].to_torch_state_dict()
            first = next(iter(state))
            state[first].view(-1)[0] = float("nan")
            reply.content["arrays"] = ArrayRecord(state)
        return reply

    return app


def _run_with(spec: RunSpec, client_app: ClientApp) -> None:
    from flwr.simulation import run_simulation

    os.environ.update(flower_environment(Path(spec.run_dir) / ".flwr"))
    failures: list[BaseException] = []
    run_simulation(server_app=build_server_app(spec, failures=failures), client_app=client_app, num_supernodes=SITES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}})
    if failures:
        raise failures[0]


def _rows(run: Path) -> dict[str, dict]:
    with (run / "metrics.csv").open() as handle:
        return {row["site"]: row for row in csv.DictReader(handle)}


def test_a_site_sending_nan_is_rejected_and_the_round_goes_on(_tiny_ptbxl_template, tmp_path):
    config = _config(_tiny_ptbxl_template, tmp_path)
    spec = RunSpec(str(config), (), str(tmp_path / "run"))
    _run_with(spec, _nan_at(0, spec))
    run = tmp_path / "run"
    rows = _rows(run)
    assert rows["iid-0"]["rejected"].startswith("finite: ") and "1 NaN/inf" in rows["iid-0"]["rejected"]
    assert rows["iid-1"]["rejected"] == rows["iid-2"]["rejected"] == ""
    assert "global" in rows
    weights = load_weights(run / "checkpoints" / "round_0001" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    # The rejected site spent its budget training: the ledger and the certificate count it.
    assert sorted(json.loads((run / "checkpoints" / "round_0001" / "ledger.json").read_text())) == ["iid-0", "iid-1", "iid-2"]
    assert len(json.loads((run / "privacy.json").read_text())["sites"]) == SITES


@pytest.fixture(scope="module")
def plain_and_secure(_tiny_ptbxl_template, tmp_path_factory):
    """One DP round plain and one under SecAgg+, the second run's sites holding copies of the first's secret keys:
    same noise, same batches, so the only difference left is SecAgg+'s quantization."""
    base = tmp_path_factory.mktemp("secagg")
    config = _config(_tiny_ptbxl_template, base)
    simulate(RunSpec(str(config), (f"federation.site_state_dir={base / 'sites-plain'}",), str(base / "plain")))
    for site_dir in (base / "sites-plain").iterdir():
        (base / "sites-secure" / site_dir.name).mkdir(parents=True)
        shutil.copy(site_dir / "secret.key", base / "sites-secure" / site_dir.name / "secret.key")
    simulate(RunSpec(str(config), (f"federation.site_state_dir={base / 'sites-secure'}",
                                   "federation.secure_aggregation=true"), str(base / "secure")))
    return base


def test_secure_aggregation_gives_the_plain_weights_within_quantization_error(plain_and_secure):
    cfg = load(plain_and_secure / "secure" / "config.yaml")
    assert cfg.federation.secure_aggregation
    plain = load_weights(plain_and_secure / "plain" / "checkpoints" / "round_0001" / "model.safetensors")
    secure = load_weights(plain_and_secure / "secure" / "checkpoints" / "round_0001" / "model.safetensors")
    assert plain.keys() == secure.keys()
    largest = max(float(v.abs().max()) for v in plain.values())
    tolerance = quantization_bound(cfg.federation, SITES) + 4 * float(np.finfo(np.float32).eps) * largest
    gap = max(float((plain[k] - secure[k]).abs().max()) for k in plain)
    assert gap <= tolerance
    # The round moved the weights far more than that: the comparison is not between two untrained models.
    initial = initial_state(cfg)[0]
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 100 * tolerance


def test_secure_aggregation_keeps_every_sites_spend_in_the_ledger(plain_and_secure):
    plain = json.loads((plain_and_secure / "plain" / "privacy.json").read_text())
    secure = json.loads((plain_and_secure / "secure" / "privacy.json").read_text())
    assert [s["site"] for s in secure["sites"]] == ["iid-0", "iid-1", "iid-2"]
    assert [(s["steps"], s["epsilon"]) for s in secure["sites"]] == [(s["steps"], s["epsilon"]) for s in plain["sites"]]
    rows = _rows(plain_and_secure / "secure")
    assert all(rows[f"iid-{i}"]["rejected"] == "" for i in range(SITES))
