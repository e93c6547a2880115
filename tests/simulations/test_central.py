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


def test_pretraining_on_the_public_pool_gives_a_base_the_federation_can_start_from(tiny_ptbxl, tmp_path):
    import dataclasses

    import pytest

    from common.bundle import BundleError, load_public_base

    path = tiny_run_config(tiny_ptbxl.root, tmp_path, train={"steps": 2, "batch_size": 4, "num_samples": 1,
                                                              "warmup_steps": 1, "lr_decay": "cosine"},
                           partition={"scheme": "site", "num_sites": 2, "public_sites": [0]})
    cfg = load(path)
    run = run_central(cfg, tmp_path / "base", progress=False, pool="public")
    base_info = json.loads((run / "base.json").read_text())
    assert base_info["records"] > 0 and "sites [0]" in base_info["trained_on"]
    assert not (run / "privacy.json").exists()  # public data: no DP, no certificate
    state, base = load_public_base(run, load(path, ["federation.init_from=" + str(run)]))
    assert base["weights_sha256"] == base_info["weights_sha256"] and state
    with pytest.raises(BundleError, match="another partition"):
        load_public_base(run, dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, public_sites=(1,))))
    with pytest.raises(BundleError, match="model section differs"):
        load_public_base(run, load(path, ["model.channels=16"]))
    with pytest.raises(ValueError, match="needs a public pool"):
        run_central(load(tiny_run_config(tiny_ptbxl.root, tmp_path / "nopool")), tmp_path / "x", progress=False, pool="public")
