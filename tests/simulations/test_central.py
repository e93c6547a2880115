"""The central baseline: the same loop, the public normalizer, and under DP a site ledger and a certificate."""

import json

import pytest

from common.bundle import read_checkpoint
from common.config import load
from common.normalization import federated_normalizer
from common.privacy import verify_release
from simulations.central import run_central
from simulations.model_card import model_card
from tests.run_configs import tiny_run_config

pytestmark = pytest.mark.slow  # whole central runs: left out of make test-fast


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
    card = model_card(run, cfg, progress, certificate, None)
    assert "Trained centrally (one data holder, no federation), 2 optimizer steps" in card and "rounds" not in card


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
    # A base written before a model key existed recorded no value for it: the key's default, which matches.
    del base_info["model"]["s4_levels"]
    (run / "base.json").write_text(json.dumps(base_info))
    assert load_public_base(run, cfg)[0]
    with pytest.raises(BundleError, match="another partition"):
        load_public_base(run, dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, public_sites=(1,))))
    with pytest.raises(BundleError, match="model section differs"):
        load_public_base(run, load(path, ["model.channels=16"]))
    with pytest.raises(BundleError, match="diffusion section differs"):
        load_public_base(run, load(path, ["diffusion.beta_end=0.05"]))
    # Sampling is not training: an evaluation that samples with fewer steps still finds its base.
    assert load_public_base(run, load(path, ["diffusion.sample_steps=3", "diffusion.sampler=ddim"]))[0]
    with pytest.raises(ValueError, match="needs a public pool"):
        run_central(load(tiny_run_config(tiny_ptbxl.root, tmp_path / "nopool")), tmp_path / "x", progress=False, pool="public")


def test_an_interrupted_pretraining_resumes_where_it_stopped(tiny_ptbxl, tmp_path, monkeypatch):
    import csv

    import pytest

    import simulations.central as central

    path = tiny_run_config(tiny_ptbxl.root, tmp_path, train={"steps": 4, "batch_size": 4, "num_samples": 1,
                                                              "log_every": 1, "sample_every": 2},
                           partition={"scheme": "site", "num_sites": 2, "public_sites": [0]})
    cfg = load(path)
    real_snapshot = central._write_snapshot

    def killed_at_first_snapshot(*args, **kwargs):
        raise KeyboardInterrupt  # the resume state of step 2 is on disk before the snapshot

    monkeypatch.setattr(central, "_write_snapshot", killed_at_first_snapshot)
    with pytest.raises(KeyboardInterrupt):
        run_central(cfg, tmp_path / "base", progress=False, pool="public")
    assert central.read_resume_state(tmp_path / "base").step == 2
    with pytest.raises(FileExistsError, match="--resume"):
        run_central(cfg, tmp_path / "base", progress=False, pool="public")

    monkeypatch.setattr(central, "_write_snapshot", real_snapshot)
    adam_steps = []
    real_train_local = central.train_local

    def watched(*args, on_log, **kwargs):
        def log(row, optimizer):
            adam_steps.append(int(next(iter(optimizer.state.values()))["step"]))
            on_log(row, optimizer)
        return real_train_local(*args, on_log=log, **kwargs)

    monkeypatch.setattr(central, "train_local", watched)
    run = run_central(cfg, tmp_path / "base", progress=False, pool="public", resume=True)
    assert adam_steps == [3, 4]  # the optimizer's moments came back with the weights
    with (run / "metrics.csv").open() as handle:
        assert [float(row["step"]) for row in csv.DictReader(handle)] == [1.0, 2.0, 3.0, 4.0]
    assert read_checkpoint(run / "checkpoints" / "final")[3]["step"] == 4
    assert not (run / central.RESUME).exists() and json.loads((run / "base.json").read_text())["steps"] == 4
    with pytest.raises(FileExistsError, match="finished"):
        run_central(cfg, run, progress=False, pool="public", resume=True)


def test_a_central_dp_run_checks_its_public_expert_before_any_step_and_certifies_it(tiny_ptbxl, tmp_path):
    from common.bundle import BundleError
    from common.config import from_dict, to_dict
    from tests.run_configs import write_public_run

    path = tiny_run_config(tiny_ptbxl.root, tmp_path, train={"steps": 2, "batch_size": 4, "num_samples": 1})
    plain = to_dict(load(path))
    expert = write_public_run(tmp_path / "expert", from_dict(
        {**plain, "diffusion": {**plain["diffusion"], "prediction": "v", "zero_terminal_snr": True}}))
    with pytest.raises(BundleError, match="no base.json"):
        run_central(load(path, [f"diffusion.expert={tmp_path / 'missing'}", "diffusion.expert_from=25"]),
                    tmp_path / "refused", progress=False)
    assert not list((tmp_path / "sites").glob("central-*/ledger.json"))  # no budget reserved, no step taken
    run = run_central(load(path, [f"diffusion.expert={expert}", "diffusion.expert_from=25"]), tmp_path / "run",
                      progress=False)
    certificate = json.loads((run / "privacy.json").read_text())
    assert certificate["public_expert"]["weights_sha256"] == json.loads((expert / "base.json").read_text())["weights_sha256"]
    assert certificate["public_expert"]["answers_from_step"] == 25 and verify_release(run) == []


def test_a_rhythm_conditioned_pretraining_writes_its_public_rhythm_table_and_private_runs_refuse_it(tiny_ptbxl, tmp_path):
    from common.bundle import RHYTHM_JSON, load_generator
    from common.hashing import sha256_file

    path = tiny_run_config(tiny_ptbxl.root, tmp_path, model={"size": "unet", "channels": 8, "rhythm": True},
                           train={"steps": 2, "batch_size": 4, "num_samples": 1},
                           partition={"scheme": "site", "num_sites": 2, "public_sites": [0]})
    run = run_central(load(path), tmp_path / "expert", progress=False, pool="public")
    table = run / "checkpoints" / "final" / RHYTHM_JSON
    base = json.loads((run / "base.json").read_text())
    assert base["rhythm_sha256"] == sha256_file(table)
    records = json.loads(table.read_text())["records"]
    assert 0 < len(records) <= base["records"] and (run / "samples.png").is_file()
    assert load_generator(run).rhythm_table() is not None
    with pytest.raises(ValueError, match="only public pretraining"):
        run_central(load(path), tmp_path / "private", progress=False)
