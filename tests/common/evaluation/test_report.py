"""evaluation.json follows its documented schema; `fedecg evaluate` runs end to end on two small folders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from common.evaluation import report
from simulations.cli import main
from tests.common.evaluation.eval_fixtures import make_eval_folders, one_torch_thread  # noqa: F401 (fixture)

TINY_SETTINGS = [
    "evaluation.classifier_epochs=1",
    "evaluation.classifier_min_steps=2",
    "evaluation.low_data_sizes=[8, 16]",
    "evaluation.max_clinical_records=40",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    return make_eval_folders(tmp_path_factory.mktemp("eval-folders"))


@pytest.fixture(scope="module")
def evaluated(folders, tmp_path_factory) -> Path:
    import torch

    real, synthetic = folders
    out = tmp_path_factory.mktemp("eval-out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [arg for s in TINY_SETTINGS + [f"data.cache_dir={out / 'cache'}"] for arg in ("--set", s)]
        code = main(["evaluate", "--synthetic", str(synthetic), "--data", str(real), "--out", str(out), "--quiet", *overrides])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.mark.slow
def test_two_folder_mode_writes_a_valid_evaluation_json(evaluated, folders):
    result = json.loads((evaluated / "evaluation.json").read_text())
    report.validate(result)  # raises on any departure from the documented schema
    assert result["mode"] == "folders" and result["quick"] is False
    inputs = result["inputs"]
    assert inputs["pairing"] == "ecg_id"  # the fixture's synthetic folder reuses real training ids
    assert (inputs["n_real_train"], inputs["n_real_test"], inputs["n_synthetic"]) == (64, 8, 24)
    assert result["memorization"]["mia"] is None  # no generator in this mode
    assert [row["n_real"] for row in result["utility"]["low_data"]] == [8, 16]
    assert result["utility"]["trtr_matched"]["n_train"] == 24
    assert 0.0 <= result["memorization"]["dcr_share_closer_to_train"] <= 1.0
    # the fixtures store derived limb leads: lead-system residuals are quantization-sized
    assert result["clinical"]["einthoven"]["synthetic"]["max_relation"] < 0.02


@pytest.mark.slow
def test_report_lists_every_section_and_its_plots(evaluated):
    result = json.loads((evaluated / "evaluation.json").read_text())
    text = (evaluated / "report.md").read_text()
    for section in ("## Fidelity", "## Clinical coherence", "## Memorization", "## Utility"):
        assert section in text
    assert set(result["plots"]) >= {"interlead_correlation", "psd", "clinical_features", "dcr", "utility", "examples"}
    for rel in result["plots"].values():
        assert (evaluated / rel).is_file() and (evaluated / rel).stat().st_size > 1000
        assert f"]({rel})" in text


@pytest.mark.slow
def test_second_run_reuses_the_cached_classifiers(evaluated, folders, tmp_path):
    cache = evaluated / "cache" / "classifiers"
    before = sorted(p.name for p in cache.glob("*.safetensors"))
    assert before  # TRTR, TSTR, low-data, age and sex models
    real, synthetic = folders
    overrides = [arg for s in TINY_SETTINGS + [f"data.cache_dir={evaluated / 'cache'}"] for arg in ("--set", s)]
    assert main(["evaluate", "--synthetic", str(synthetic), "--data", str(real), "--out", str(tmp_path), "--quiet", *overrides]) == 0
    assert sorted(p.name for p in cache.glob("*.safetensors")) == before
    first = json.loads((evaluated / "evaluation.json").read_text())
    second = json.loads((tmp_path / "evaluation.json").read_text())
    assert second["utility"] == first["utility"] and second["fidelity"] == first["fidelity"]


@pytest.mark.slow
def test_schema_rejects_malformed_reports(evaluated):
    good = json.loads((evaluated / "evaluation.json").read_text())
    cases = [
        (lambda r: r["fidelity"].pop("interlead_corr_error"), "missing key 'interlead_corr_error'"),
        (lambda r: r["utility"]["tstr"].__setitem__("macro_auroc_superclasses", 1.3), "above the maximum"),
        (lambda r: r.__setitem__("mode", "other"), "not one of"),
        (lambda r: r["memorization"].__setitem__("near_copy_rate", "low"), "expected number"),
        (lambda r: r["inputs"].__setitem__("surprise", 1), "unexpected key 'surprise'"),
        (lambda r: r["fidelity"].__setitem__("frechet_distance", float("nan")), "expected number or null"),
    ]
    for mutate, message in cases:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(report.SchemaError, match=message):
            report.validate(bad)


@pytest.mark.slow
def test_bad_command_lines_fail_with_a_clear_message(folders, tmp_path, capsys):
    real, synthetic = folders
    assert main(["evaluate", "--synthetic", str(tmp_path), "--data", str(real), "--out", str(tmp_path / "o")]) == 2
    assert "no ptbxl_database.csv" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(synthetic), "--data", str(real), "--out", str(tmp_path / "o"),
                 "--set", "model.size=sssd"]) == 2
    assert "evaluate accepts evaluation.*" in capsys.readouterr().err
    assert main(["evaluate", "--synthetic", str(synthetic), "--data", str(real), "--out", str(tmp_path / "o"),
                 "--set", "evaluation.test_folds=[10]"]) == 2
    assert "no real records in evaluation.test_folds=[10]" in capsys.readouterr().err


def write_tiny_bundle(out: Path, real: Path) -> Path:
    """A release bundle of an untrained tiny denoiser (fast to sample), written with the bundle API."""
    import torch
    import yaml

    from common.bundle import WEIGHTS, save_weights, write_bundle
    from common.config import DataConfig, from_dict, to_dict
    from common.data.dataset import load_dataset
    from common.model.denoiser import build_denoiser
    from common.normalization import Normalizer

    cfg = from_dict({"model": {"size": "tiny"}, "diffusion": {"timesteps": 20, "sample_steps": 2}})
    torch.manual_seed(0)
    weights = out.parent / "tiny.safetensors"
    save_weights(weights, build_denoiser(cfg.model).state_dict())
    signals = load_dataset(DataConfig(root=str(real), cache_dir=str(out.parent / "cache")), progress=False).signals
    return write_bundle(out, {
        WEIGHTS: weights,
        "config.yaml": yaml.safe_dump(to_dict(cfg)).encode(),
        "normalization.json": json.dumps(Normalizer.fit(signals).to_dict()).encode(),
        "MODEL_CARD.md": b"tiny untrained test model\n",
    })


@pytest.mark.slow
def test_bundle_mode_samples_like_the_training_records_and_attacks_the_model(folders, tmp_path, one_torch_thread):
    real, _ = folders
    bundle = write_tiny_bundle(tmp_path / "bundle", real)
    out = tmp_path / "out"
    settings = TINY_SETTINGS + ["evaluation.num_synthetic=12", "evaluation.mia_records=8", "evaluation.mia_timesteps=2",
                                f"data.cache_dir={tmp_path / 'cache'}"]
    code = main(["evaluate", "--bundle", str(bundle), "--data", str(real), "--out", str(out), "--quiet",
                 *[arg for s in settings for arg in ("--set", s)]])
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    report.validate(result)
    assert result["mode"] == "bundle" and result["inputs"]["bundle"] == str(bundle)
    assert result["inputs"]["n_synthetic"] == 12 and result["inputs"]["pairing"] == "ecg_id"
    assert (out / "synthetic" / "ptbxl_database.csv").is_file()  # the sampled cohort, in PTB-XL format
    assert result["memorization"]["mia"]["mia_n_members"] == 8
    assert "mia_roc" in result["plots"]


@pytest.mark.slow
def test_bundle_mode_samples_with_the_evaluation_eta_and_the_bundle_steps(folders, tmp_path, one_torch_thread):
    from common.config import from_dict
    from common.evaluation.pipeline import prepare_bundle, resolve_settings

    real, _ = folders
    bundle = write_tiny_bundle(tmp_path / "bundle", real)
    cfg = from_dict({"data": {"cache_dir": str(tmp_path / "cache")},
                     "evaluation": {"num_synthetic": 4, "sample_eta": 1.0, "sample_guidance": 2.0}})
    data = prepare_bundle(bundle, real, tmp_path / "out", cfg, resolve_settings(cfg.evaluation), progress=False)
    sampled = data.generator.cfg.diffusion
    assert (sampled.eta, sampled.sample_steps, sampled.sampler) == (1.0, 2, "ddim") and len(data.synthetic.ecg_ids) == 4
    assert sampled.guidance_scale == 2.0


@pytest.mark.slow
def test_real_vs_real_mode_uses_unseen_real_records_as_the_synthetic_set(folders, tmp_path, one_torch_thread):
    real, _ = folders
    out = tmp_path / "rvr"
    overrides = TINY_SETTINGS + ["evaluation.num_synthetic=16", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["evaluate", "--real-vs-real", "--data", str(real), "--out", str(out), "--quiet",
                 *[arg for s in overrides for arg in ("--set", s)]]) == 0
    result = json.loads((out / "evaluation.json").read_text())
    report.validate(result)
    assert result["mode"] == "real_vs_real" and result["inputs"]["synthetic"] is None
    assert result["inputs"]["pairing"] == "labels" and result["utility"]["trtr_matched"] is None
    # half A trains, 16 records of half B (other patients) play the synthetic set
    assert result["inputs"]["n_synthetic"] == 16 and result["inputs"]["n_real_train"] + 16 <= 64


def test_quick_lowers_or_bounds_every_size_and_bad_settings_are_named():
    import dataclasses

    from common.config import EvaluationConfig
    from common.evaluation.pipeline import resolve_settings

    full = resolve_settings(EvaluationConfig())
    quick = resolve_settings(EvaluationConfig(), quick=True)
    assert quick.quick and not full.quick
    sizes = [f.name for f in dataclasses.fields(full) if type(getattr(full, f.name)) is int and f.name != "seed"]
    assert len(sizes) == 7
    assert all(getattr(quick, name) <= getattr(full, name) for name in sizes)
    assert quick.num_synthetic < full.num_synthetic
    # "all records" and "the bundle's own steps" get a bound; the low-data curve keeps its smaller points
    assert full.max_classifier_records is None and quick.max_classifier_records is not None
    assert full.sample_steps is None and quick.sample_steps is not None
    assert set(quick.low_data_sizes) < set(full.low_data_sizes)
    small = resolve_settings(EvaluationConfig(num_synthetic=50, sample_steps=5), quick=True)
    assert small.num_synthetic == 50 and small.sample_steps == 5  # quick never raises a size
    with pytest.raises(ValueError, match="evaluation.mia_records must be >= 1"):
        resolve_settings(EvaluationConfig(mia_records=0))
    with pytest.raises(ValueError, match="evaluation.sample_eta must lie in"):
        resolve_settings(EvaluationConfig(sample_eta=1.5))
    with pytest.raises(ValueError, match="evaluation.sample_guidance must be >= 0"):
        resolve_settings(EvaluationConfig(sample_guidance=-1.0))
    with pytest.raises(ValueError, match="evaluation.test_folds is empty"):
        resolve_settings(EvaluationConfig(test_folds=()))
