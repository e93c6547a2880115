"""`fedecg export`: a run directory's latest checkpoint -> a verified bundle whose model card tells how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.bundle import WEIGHTS, BundleError, initial_state, load_generator, save_checkpoint, verify_bundle
from common.config import Config, from_dict, save
from common.hashing import sha256_file
from common.normalization import federated_normalizer
from common.privacy import verify_release
from common.privacy.accounting import plan_budget
from common.privacy.certificate import build_certificate, planned_steps, write_certificate
from common.run_dir import CHECKPOINTS, write_latest
from simulations.export import export_bundle
from tests.run_configs import write_public_run

# A fixed noise multiplier keeps the certificate cheap to build and to verify (no calibration).
DP = {"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 8.0, "delta": 1e-5}


def tiny_cfg(**sections) -> Config:
    return from_dict({"model": {"size": "tiny"}, "diffusion": {"timesteps": 20, "sample_steps": 2},
                      "partition": {"scheme": "iid", "num_sites": 2},
                      "federation": {"rounds": 2, "local_steps": 3, "strategy": "fedavg"}, **sections})


def spent_budgets(cfg: Config) -> list:
    """Two iid sites' budgets, each spent as planned."""
    budgets = []
    for site, n in {"iid-0": 120, "iid-1": 96}.items():
        budget = plan_budget(site, cfg.privacy, cfg.train.batch_size, n, planned_steps(cfg, "federated"))
        budget.steps = budget.planned_steps
        budgets.append(budget)
    return budgets


def write_run(run: Path, cfg: Config, progress: dict, shift: float = 0.0) -> Path:
    """A run directory as training leaves it: its resolved config and one checkpoint named by checkpoints/latest."""
    state, _ = initial_state(cfg)
    save(cfg, run)
    save_checkpoint(run / CHECKPOINTS / "final", {k: v + shift for k, v in state.items()}, cfg,
                    federated_normalizer(), progress)
    write_latest(run, "final")
    return run


def certify(run: Path, cfg: Config, records: dict[str, int]) -> dict:
    """The certificate a federated run writes: every site took its whole plan."""
    budgets = []
    for site, n in records.items():
        budget = plan_budget(site, cfg.privacy, cfg.train.batch_size, n, planned_steps(cfg, "federated"))
        budget.steps = budget.planned_steps
        budgets.append(budget)
    weights = sha256_file(run / CHECKPOINTS / "final" / WEIGHTS)
    certificate = build_certificate(cfg, budgets, "federated", weights)
    write_certificate(run / "privacy.json", certificate)
    return certificate


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    cfg = tiny_cfg(privacy=DP, train={"batch_size": 8})
    run = write_run(tmp_path_factory.mktemp("federated") / "run", cfg, {"round": 2})
    return run, cfg, certify(run, cfg, {"iid-0": 120, "iid-1": 96})


def test_a_federated_dp_export_carries_a_certificate_that_verifies(federated, tmp_path):
    run, _, certificate = federated
    bundle = export_bundle(run, tmp_path / "bundle")
    assert verify_bundle(bundle) == [] and verify_release(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {WEIGHTS, "config.yaml", "normalization.json", "labels.json", "privacy.json",
                                      "MODEL_CARD.md"}
    assert manifest["outside_dp_guarantee"] == {}  # nothing computed from real records rides along
    assert len(json.loads((bundle / "labels.json").read_text())) == 71
    gen = load_generator(bundle)
    assert gen.normalizer.to_dict() == federated_normalizer().to_dict()
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Federated with Flower, strategy `fedavg`, 2 rounds of 3 local steps" in card
    for site in certificate["sites"]:  # the per-site table a reader checks the claim against
        assert (f"| {site['site']} | {site['num_records']} | {site['epsilon']:.3f} | {site['epsilon_add_remove']:.3f} |"
                in card)
    assert certificate["release"]["statement"] in card and "fedecg privacy verify" in card
    assert "## Evaluation" not in card and "Empirical privacy audit" not in card


def test_a_central_export_counts_optimizer_steps_not_rounds(tmp_path):
    run = write_run(tmp_path / "run", tiny_cfg(privacy={"enabled": False}), {"kind": "central", "step": 7})
    card = (export_bundle(run, tmp_path / "bundle") / "MODEL_CARD.md").read_text()
    assert "Trained centrally (one data holder, no federation), 7 optimizer steps" in card
    assert "rounds" not in card and "?" not in card.split("## Training")[1].split("\n\n")[0]
    assert "**None.** This generator was trained without differential privacy" in card
    assert not (tmp_path / "bundle" / "privacy.json").exists()


def test_a_private_run_is_not_exported_without_a_certificate_that_verifies(federated, tmp_path):
    _, cfg, certificate = federated
    bare = write_run(tmp_path / "bare", cfg, {"round": 2}, shift=0.5)  # the same config, other weights
    with pytest.raises(FileNotFoundError, match="privacy is enabled but the run wrote no privacy.json"):
        export_bundle(bare, tmp_path / "bundle")
    claimed = dict(certificate, sites=[dict(certificate["sites"][0], epsilon=certificate["sites"][0]["epsilon"] / 2),
                                       *certificate["sites"][1:]])
    write_certificate(bare / "privacy.json", claimed)
    with pytest.raises(ValueError, match="does not verify: .*recomputed epsilon"):
        export_bundle(bare, tmp_path / "bundle")
    write_certificate(bare / "privacy.json", certificate)  # valid, but issued for the other run's weights
    with pytest.raises(ValueError, match="not the weights the certificate was issued for"):
        export_bundle(bare, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_export_refuses_a_run_without_checkpoints_a_bad_evaluation_or_a_used_directory(federated, tmp_path):
    run, _, _ = federated
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint to export"):
        export_bundle(tmp_path / "empty", tmp_path / "bundle")
    with pytest.raises(FileNotFoundError, match="--evaluation .*: no such file"):
        export_bundle(run, tmp_path / "bundle", evaluation=tmp_path / "missing.json")
    bad = tmp_path / "evaluation.json"
    bad.write_text(json.dumps({"fidelity": {}}))
    with pytest.raises(ValueError, match="is not a fedecg evaluation report"):
        export_bundle(run, tmp_path / "bundle", evaluation=bad)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("someone's notes")
    with pytest.raises(BundleError, match="exists and is not empty"):
        export_bundle(run, used)
    assert (used / "notes.txt").read_text() == "someone's notes"


def test_a_release_carries_the_public_expert_its_certificate_names_and_samples_with_it(tmp_path):
    from common.expert import EXPERT_JSON, EXPERT_WEIGHTS, expert_provenance
    from common.privacy import verify_certificate

    expert_cfg = tiny_cfg(diffusion={"timesteps": 20, "prediction": "v", "zero_terminal_snr": True})
    expert_run = write_public_run(tmp_path / "expert", expert_cfg)
    cfg = tiny_cfg(privacy=DP, train={"batch_size": 8},
                   diffusion={"timesteps": 20, "sample_steps": 2, "expert": str(expert_run), "expert_from": 12})
    run = write_run(tmp_path / "run", cfg, {"round": 2})
    budgets = spent_budgets(cfg)
    weights = sha256_file(run / CHECKPOINTS / "final" / WEIGHTS)
    provenance = expert_provenance(cfg, federated_normalizer())
    certificate = build_certificate(cfg, budgets, "federated", weights, public_expert=provenance)
    assert "public expert at the noise steps t >= 12" in certificate["release"]["statement"]
    assert any("public_expert does not match" in p for p in verify_certificate(dict(certificate, public_expert=None)))
    write_certificate(run / "privacy.json", certificate)

    bundle = export_bundle(run, tmp_path / "bundle")
    assert verify_bundle(bundle) == [] and verify_release(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {EXPERT_WEIGHTS, EXPERT_JSON} <= set(manifest["files"]) and manifest["outside_dp_guarantee"] == {}
    assert f"weights sha256 `{provenance['weights_sha256']}`" in (bundle / "MODEL_CARD.md").read_text()
    import shutil

    shutil.rmtree(expert_run)  # the bundle is self-contained: it samples with its own copy
    gen = load_generator(bundle)
    assert gen.expert is not None and gen.expert.provenance["weights_sha256"] == provenance["weights_sha256"]
    assert gen.expert.diffusion.cfg.prediction == "v"

    # Another expert swapped in, manifest regenerated: the certificate still names the first one.
    swapped = tmp_path / "swapped"
    other = write_public_run(tmp_path / "other", expert_cfg, seed=1) / CHECKPOINTS / "final" / WEIGHTS
    files = {name: bundle / name for name in manifest["files"]}
    files[EXPERT_WEIGHTS] = other
    from common.bundle import write_bundle

    write_bundle(swapped, files)
    assert any("not the public expert the certificate names" in p for p in verify_release(swapped))
    with pytest.raises(BundleError, match="not the weights expert.json describes"):
        load_generator(swapped)
    # An expert file dropped into a bundle whose manifest does not list it is refused, not sampled with.
    plain = export_bundle(write_run(tmp_path / "plain", tiny_cfg(privacy={"enabled": False}), {"round": 1}),
                          tmp_path / "plain-bundle")
    (plain / EXPERT_WEIGHTS).write_bytes(other.read_bytes())
    assert any("present but not listed" in p for p in verify_bundle(plain))
    with pytest.raises(BundleError, match="failed verification"):
        load_generator(plain)


def test_a_rhythm_conditioned_expert_travels_with_its_rhythm_table_and_the_certificate_names_both(tmp_path):
    import numpy as np

    from common.bundle import write_bundle
    from common.expert import EXPERT_RHYTHM, expert_provenance
    from common.rhythm import RhythmTable

    table = RhythmTable(100, (("SR",), ("AFIB",)), np.array([0.9, 0.6]), np.array([0.02, 0.2]))
    expert_cfg = tiny_cfg(model={"size": "unet", "channels": 8, "rhythm": True},
                          diffusion={"timesteps": 20, "prediction": "v", "zero_terminal_snr": True})
    expert_run = write_public_run(tmp_path / "expert", expert_cfg, rhythm=table)
    cfg = tiny_cfg(privacy=DP, train={"batch_size": 8},
                   diffusion={"timesteps": 20, "sample_steps": 2, "expert": str(expert_run), "expert_from": 12})
    run = write_run(tmp_path / "run", cfg, {"round": 2})
    budgets = spent_budgets(cfg)
    provenance = expert_provenance(cfg, federated_normalizer())
    certificate = build_certificate(cfg, budgets, "federated", sha256_file(run / CHECKPOINTS / "final" / WEIGHTS),
                                    public_expert=provenance)
    assert "rhythm table of the same public records" in certificate["release"]["statement"]
    write_certificate(run / "privacy.json", certificate)

    bundle = export_bundle(run, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert EXPERT_RHYTHM in manifest["files"] and verify_release(bundle) == []
    assert f"sha256 `{provenance['rhythm_sha256']}`" in (bundle / "MODEL_CARD.md").read_text()
    gen = load_generator(bundle)
    assert gen.rhythm_table().keys == table.keys
    # Another table swapped in, manifest regenerated: the certificate and expert.json still name the first.
    swapped = tmp_path / "swapped"
    files = {name: bundle / name for name in manifest["files"]}
    other = tmp_path / "other.json"
    other.write_bytes(RhythmTable(100, ((),), np.array([0.4]), np.array([0.0])).to_bytes())
    files[EXPERT_RHYTHM] = other
    write_bundle(swapped, files)
    assert any(f"{EXPERT_RHYTHM}: not the public expert" in p for p in verify_release(swapped))
    with pytest.raises(BundleError, match="sha256 differs"):
        load_generator(swapped)


def test_the_model_card_gives_the_rate_and_the_subset_the_sites_trained_with(tmp_path):
    cfg = tiny_cfg(privacy={"enabled": False}, train={"lr": 0.003},
                   federation={"rounds": 2, "local_steps": 3, "local_lr": 0.0002, "trainable": ["label_proj", "film"]})
    bundle = export_bundle(write_run(tmp_path / "run", cfg, {"round": 2}), tmp_path / "bundle")
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "AdamW lr 0.0002, training only the parameters under label_proj, film" in card and "lr 0.003" not in card
