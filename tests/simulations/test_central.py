"""The central baseline: the same loop, the public normalizer, and under DP a site ledger and a certificate."""

import json

from common.bundle import read_checkpoint
from common.config import load
from common.normalization import federated_normalizer
from common.privacy import verify_release
from simulations.central import run_central
from tests.run_configs import tiny_run_config


def test_central_dp_run_uses_public_constants_and_certifies_its_weights(tiny_ptbxl, tmp_path):
    cfg = load(tiny_run_config(tiny_ptbxl.root, tmp_path, train={"steps": 2, "batch_size": 4, "num_samples": 1}))
    run = run_central(cfg, tmp_path / "run", progress=False)
    _, _, normalizer, progress = read_checkpoint(run / "checkpoints" / "final")
    # Statistics fitted on the training records would be an unaccounted release.
    assert normalizer.to_dict() == federated_normalizer().to_dict()
    assert verify_release(run) == []
    certificate = json.loads((run / "privacy.json").read_text())
    assert certificate["kind"] == "central" and certificate["sites"][0]["steps"] == 2 == progress["step"]
    assert len(list((tmp_path / "sites").glob("central-*/ledger.json"))) == 1
