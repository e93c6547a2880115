"""The federation end to end on Flower's simulation engine, resume, export, verify and sample from the bundle."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import wfdb

from common.bundle import BundleError, load_generator, load_weights
from common.config import RunSpec
from common.privacy import verify_certificate
from simulations.export import export_bundle
from simulations.simulate import simulate
from tests.run_configs import tiny_run_config

pytestmark = pytest.mark.slow


def _state_dir(directory):
    return (f"federation.site_state_dir={directory}",)


@pytest.fixture(scope="module")
def federation(_tiny_ptbxl_template, tmp_path_factory):
    """One uninterrupted 3-round run, and the same run stopped after round 2 and resumed.

    The second run's sites hold copies of the first run's secret keys (and nothing else of their ledgers),
    as a site restored from its own backup would: that is what makes the resumed run bit-identical.
    """
    base = tmp_path_factory.mktemp("federation")
    config = tiny_run_config(_tiny_ptbxl_template.root, base, federation={"rounds": 3, "local_steps": 2, "min_sites": 2, "sample_every": 3})
    straight = base / "straight"
    simulate(RunSpec(str(config), _state_dir(base / "sites-straight"), str(straight)))
    for site_dir in (base / "sites-straight").iterdir():
        (base / "sites-resumed" / site_dir.name).mkdir(parents=True)
        shutil.copy(site_dir / "secret.key", base / "sites-resumed" / site_dir.name / "secret.key")
    interrupted = base / "interrupted"
    simulate(RunSpec(str(config), _state_dir(base / "sites-resumed"), str(interrupted), until_round=2))
    stopped_after = sorted(p.name for p in (interrupted / "checkpoints").glob("round_*"))
    simulate(RunSpec(str(interrupted / "config.yaml"), (), str(interrupted), resume=True))
    return {"straight": straight, "interrupted": interrupted, "stopped_after": stopped_after, "base": base}


def test_two_site_simulation_runs_end_to_end(federation):
    run = federation["straight"]
    assert sorted(p.name for p in (run / "checkpoints").glob("round_*")) == ["round_0001", "round_0002", "round_0003"]
    rows = (run / "metrics.csv").read_text().splitlines()
    sites = {line.split(",")[rows[0].split(",").index("site")] for line in rows[1:]}
    assert sites == {"iid-0", "iid-1", "global"}
    certificate = json.loads((run / "privacy.json").read_text())
    assert verify_certificate(certificate) == []
    assert len(certificate["sites"]) == 2
    assert all(0 < s["epsilon_add_remove"] < s["epsilon"] <= s["target_epsilon"] for s in certificate["sites"])
    assert all(s["steps"] == 6 for s in certificate["sites"])
    assert (run / "samples_round003.png").stat().st_size > 10_000
    # Memorization is checked inside each site on its own records; the reports stay at the sites.
    memorization = json.loads((run / "site_memorization.json").read_text())
    assert memorization["checked_at_sites"] == ["iid-0", "iid-1"]
    reports = [json.loads(p.read_text()) for p in (federation["base"] / "sites-straight").glob("*/memorization.json")]
    assert sorted(r["site"] for r in reports) == ["iid-0", "iid-1"]
    assert all(0.0 <= r["mia_auc"] <= 1.0 and 0.0 <= r["near_copy_rate"] <= 1.0 for r in reports)
    # Under DP no loss or timing reached the server.
    header = rows[0].split(",")
    assert all(not line.split(",")[header.index("loss")] for line in rows[1:])
    assert (run / "rounds.png").is_file()


def test_resumed_run_gives_the_same_weights(federation):
    assert federation["stopped_after"] == ["round_0001", "round_0002"]
    a = load_weights(federation["straight"] / "checkpoints" / "round_0003" / "model.safetensors")
    b = load_weights(federation["interrupted"] / "checkpoints" / "round_0003" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca = json.loads((federation["straight"] / "privacy.json").read_text())
    cb = json.loads((federation["interrupted"] / "privacy.json").read_text())
    assert [s["epsilon"] for s in ca["sites"]] == [s["epsilon"] for s in cb["sites"]]


def _fedecg(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=300)


def test_bundle_export_verify_and_sample(federation, _tiny_ptbxl_template):
    bundle = export_bundle(federation["straight"], federation["base"] / "bundle")
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Privacy guarantee" in card and "iid-0" in card
    verified = _fedecg("privacy", "verify", str(bundle))
    assert verified.returncode == 0, verified.stderr
    assert "OK" in verified.stdout
    out = federation["base"] / "samples"
    sampled = _fedecg("sample", "--bundle", str(bundle), "--n", "2", "--labels", "IMI", "--age", "67", "--sex", "female",
                      "--out", str(out), "--quiet")
    assert sampled.returncode == 0, sampled.stderr
    signal, fields = wfdb.rdsamp(str(out / "records100" / "synthetic_00000"))
    assert signal.shape == (1000, 12) and fields["fs"] == 100 and fields["units"] == ["mV"] * 12
    assert (out / "conditions.csv").is_file() and (out / "samples.png").is_file()
    like = federation["base"] / "like"
    liked = _fedecg("sample", "--bundle", str(bundle), "--like", str(_tiny_ptbxl_template.root / "ptbxl_database.csv"),
                    "--n", "3", "--out", str(like), "--quiet")
    assert liked.returncode == 0, liked.stderr
    # The synthetic cohort is a PTB-XL folder with synthetic ids, readable by the project's own data layer.
    from common.config import DataConfig
    from common.data.dataset import load_dataset

    synthetic = load_dataset(DataConfig(root=str(like), cache_dir=str(federation["base"] / "cache")), progress=False)
    assert list(synthetic.ecg_ids) == [1, 2, 3]
    assert synthetic.signals.shape == (3, 8, 1000)


def test_a_bundle_with_other_weights_and_a_regenerated_manifest_is_refused(federation):
    bundle = export_bundle(federation["straight"], federation["base"] / "bundle-swapped")
    other = federation["interrupted"] / "checkpoints" / "round_0002" / "model.safetensors"
    shutil.copy(other, bundle / "model.safetensors")
    manifest = json.loads((bundle / "manifest.json").read_text())
    from common.hashing import sha256_file

    manifest["files"]["model.safetensors"] = sha256_file(bundle / "model.safetensors")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _fedecg("privacy", "verify", str(bundle))
    assert result.returncode == 1
    assert "not the weights the certificate was issued for" in result.stderr


def test_export_includes_a_valid_evaluation_and_refuses_an_invalid_one(federation):
    bad = federation["base"] / "not-an-evaluation.json"
    bad.write_text(json.dumps({"fidelity": {}}))
    with pytest.raises(ValueError, match="not a fedecg evaluation report"):
        export_bundle(federation["straight"], federation["base"] / "bundle-bad-eval", evaluation=bad)


def test_an_evaluation_rides_only_on_request_and_labelled_outside_dp(federation, monkeypatch):
    plain = export_bundle(federation["straight"], federation["base"] / "bundle-plain")
    assert not (plain / "evaluation.json").exists()
    report = federation["base"] / "evaluation.json"
    report.write_text(json.dumps({"fidelity": {"ilce": 0.1}}))
    monkeypatch.setattr("common.evaluation.report.validate", lambda _: None)  # the schema has its own tests
    bundle = export_bundle(federation["straight"], federation["base"] / "bundle-eval", evaluation=report)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["outside_dp_guarantee"]) == {"evaluation.json"}
    assert "## Evaluation (outside the DP guarantee)" in (bundle / "MODEL_CARD.md").read_text()


def test_corrupted_bundle_is_refused(federation):
    bundle = federation["base"] / "bundle-corrupt"
    export_bundle(federation["straight"], bundle)
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors: SHA256 mismatch"):
        load_generator(bundle)
    result = _fedecg("privacy", "verify", str(bundle))
    assert result.returncode == 1 and "SHA256 mismatch" in result.stderr


def test_privacy_verify_catches_a_tampered_certificate(federation):
    run = federation["base"] / "tampered"
    shutil.copytree(federation["straight"], run)
    certificate = json.loads((run / "privacy.json").read_text())
    certificate["sites"][0]["epsilon"] /= 2
    certificate["release"]["epsilon"] = max(s["epsilon"] for s in certificate["sites"])
    (run / "privacy.json").write_text(json.dumps(certificate))
    result = _fedecg("privacy", "verify", str(run))
    assert result.returncode == 1
    assert "recomputed epsilon" in result.stderr
    # A certificate of a site that claims more noise than it was planned with does not verify either.
    certificate = json.loads((federation["straight"] / "privacy.json").read_text())
    certificate["sites"][0]["noise_multiplier"] *= 2
    assert any("calibrated" in p for p in verify_certificate(certificate))


def test_privacy_audit_command_plants_scores_and_reports(_tiny_ptbxl_template, tmp_path):
    config = tiny_run_config(_tiny_ptbxl_template.root, tmp_path, federation={"rounds": 2, "local_steps": 2, "min_sites": 2})
    out = tmp_path / "audit"
    audited = _fedecg("privacy", "audit", "--config", str(config), "--pairs", "4", "--set", "audit.kinds=[ood]",
                      "--set", "audit.noise_draws=1", "--out", str(out))
    assert audited.returncode == 0, audited.stderr[-3000:]
    assert "empirical epsilon lower bound" in audited.stdout and "certified epsilon" in audited.stdout
    report = json.loads((out / "run" / "audit.json").read_text())
    certificate = json.loads((out / "run" / "privacy.json").read_text())
    assert report["certified_epsilon"] == certificate["release"]["epsilon"]
    assert report["bound"]["slots"] == 8 and sorted(report["sites"]) == ["iid-0", "iid-1"]
    assert 0.0 <= report["empirical_epsilon_lower_bound"] < report["certified_epsilon"]
    # The coins stay at the sites: each site's state directory holds them, the server's run directory not.
    coin_files = sorted((out / "sites").glob("*/audit/*.json"))
    assert len(coin_files) == 2
    entropy = json.loads(coin_files[0].read_text())["entropy"]
    assert all(str(entropy) not in p.read_text() for p in (out / "run").rglob("*") if p.suffix in (".json", ".csv", ".txt"))
    # Each site declared N = its records + one per slot, the N the certificate publishes.
    assert all(s["num_records"] > 4 for s in certificate["sites"])
    bundle = export_bundle(out / "run", tmp_path / "bundle")
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Empirical privacy audit" in card and (bundle / "audit.json").is_file()
