"""Checkpoints and release bundles: what is written reads back, and what was altered is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.bundle import (
    WEIGHTS, BundleError, initial_state, load_generator, read_checkpoint, save_checkpoint, verify_bundle, write_bundle,
)
from common.config import config_hash, from_dict, to_dict
from common.model.denoiser import build_denoiser
from common.normalization import Normalizer
from common.run_dir import CHECKPOINTS, write_latest

TINY = {"model": {"size": "tiny"}, "diffusion": {"timesteps": 20, "sample_steps": 2}, "train": {"seed": 3}}


@pytest.fixture(scope="module")
def tiny():
    """A tiny config, its seeded initial weights and a fitted (not the public) normalizer."""
    cfg = from_dict(TINY)
    state, _ = initial_state(cfg)
    signals = np.random.default_rng(0).normal(0.1, 0.4, size=(3, 8, 200)).astype(np.float32)
    return cfg, state, Normalizer.fit(signals)


def bundle_files(tiny, directory: Path) -> dict[str, bytes | Path]:
    cfg, state, normalizer = tiny
    checkpoint = save_checkpoint(directory / "checkpoint", state, cfg, normalizer, {"kind": "central", "step": 1})
    return {
        WEIGHTS: checkpoint / WEIGHTS,
        "config.yaml": yaml.safe_dump(to_dict(cfg)).encode(),
        "normalization.json": json.dumps(normalizer.to_dict()).encode(),
        "MODEL_CARD.md": b"# a test card\n",
    }


@pytest.fixture
def bundle(tiny, tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", bundle_files(tiny, tmp_path), {"MODEL_CARD.md": "written by hand"})


def assert_same_generator(gen, tiny) -> None:
    cfg, state, normalizer = tiny
    assert config_hash(gen.cfg) == config_hash(cfg)
    loaded = gen.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert np.array_equal(gen.normalizer.mean, normalizer.mean) and np.array_equal(gen.normalizer.std, normalizer.std)
    assert not gen.model.training  # sampling needs eval mode


def test_a_checkpoint_reads_back_weights_config_normalizer_and_progress(tiny, tmp_path):
    cfg, state, normalizer = tiny
    save_checkpoint(tmp_path / "ck", state, cfg, normalizer, {"round": 2, "sites": ["a", "b"]})
    back, back_cfg, back_norm, progress = read_checkpoint(tmp_path / "ck")
    assert all(torch.equal(back[k], state[k]) for k in state) and back.keys() == state.keys()
    assert back_cfg == cfg and progress == {"round": 2, "sites": ["a", "b"]}
    assert back_norm.to_dict() == normalizer.to_dict()
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert meta["config_sha256"] == config_hash(cfg)  # a checkpoint carries its config and hash


def test_a_checkpoint_with_other_weights_or_format_is_refused(tiny, tmp_path):
    cfg, state, normalizer = tiny
    ck = save_checkpoint(tmp_path / "ck", state, cfg, normalizer, {})
    with pytest.raises(BundleError, match="no checkpoint.json"):
        read_checkpoint(tmp_path)
    other = {k: v + 1 for k, v in state.items()}
    save_checkpoint(tmp_path / "other", other, cfg, normalizer, {})
    (ck / WEIGHTS).write_bytes((tmp_path / "other" / WEIGHTS).read_bytes())
    with pytest.raises(BundleError, match="checksum does not match checkpoint.json"):
        read_checkpoint(ck)
    meta = json.loads((ck / "checkpoint.json").read_text())
    (ck / "checkpoint.json").write_text(json.dumps(dict(meta, format="fedecg-checkpoint/99")))
    with pytest.raises(BundleError, match="unknown format 'fedecg-checkpoint/99'"):
        read_checkpoint(ck)


def test_a_generator_loads_from_a_bundle_a_checkpoint_or_a_run_directory(tiny, bundle, tmp_path):
    cfg, state, normalizer = tiny
    assert_same_generator(load_generator(bundle), tiny)
    run = tmp_path / "run"
    for name, step in (("step_1", 1), ("step_2", 2)):
        save_checkpoint(run / CHECKPOINTS / name, {k: v * step for k, v in state.items()}, cfg, normalizer, {"step": step})
    write_latest(run, "step_1")  # the pointer, not the newest folder, names the current checkpoint
    assert_same_generator(load_generator(run), tiny)
    assert load_generator(run / CHECKPOINTS / "step_1").source == run / CHECKPOINTS / "step_1"


def test_the_manifest_lists_every_file_and_what_lies_outside_dp(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in bundle.iterdir() if p.name != "manifest.json")
    assert manifest["outside_dp_guarantee"] == {"MODEL_CARD.md": "written by hand"}
    assert verify_bundle(bundle) == []


@pytest.mark.parametrize("damage, problem", [
    (lambda b: (b / "config.yaml").write_text((b / "config.yaml").read_text().replace("timesteps: 20", "timesteps: 21")),
     "config.yaml: SHA256 mismatch"),
    (lambda b: (b / "normalization.json").unlink(), "normalization.json: missing"),
    (lambda b: (b / "MODEL_CARD.md").write_text("# a friendlier card\n"), "MODEL_CARD.md: SHA256 mismatch"),
])
def test_a_tampered_or_incomplete_bundle_is_refused_naming_the_file(bundle, damage, problem):
    damage(bundle)
    assert any(problem in p for p in verify_bundle(bundle)), verify_bundle(bundle)
    with pytest.raises(BundleError, match=f"bundle failed verification: .*{problem}"):
        load_generator(bundle)


def test_a_manifest_must_cover_the_files_a_generator_needs(tiny, tmp_path):
    files = bundle_files(tiny, tmp_path)
    del files["normalization.json"]
    bundle = write_bundle(tmp_path / "partial", files)
    assert verify_bundle(bundle) == ["normalization.json: not listed in the manifest"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(dict(manifest, format="other-bundle/2")))
    assert verify_bundle(bundle) == ["unknown bundle format 'other-bundle/2'"]


def test_weights_that_do_not_fit_the_config_are_refused(tiny, tmp_path):
    cfg, state, normalizer = tiny
    foreign = dict(state, extra_head=torch.zeros(3))
    del foreign["output_proj.weight"]
    save_checkpoint(tmp_path / "ck", foreign, cfg, normalizer, {})
    with pytest.raises(BundleError, match=r"do not fit the configured model \(missing \['output_proj.weight'\], "
                                          r"unexpected \['extra_head'\]"):
        load_generator(tmp_path / "ck")


def test_weights_of_another_width_are_refused_as_a_bundle_error(tiny, tmp_path):
    cfg, _, normalizer = tiny
    torch.manual_seed(0)
    wider = build_denoiser(from_dict({"model": {"size": "tiny", "channels": 16}}).model).state_dict()
    save_checkpoint(tmp_path / "ck", wider, cfg, normalizer, {})  # its config says 32 channels
    with pytest.raises(BundleError, match="weights do not fit the configured model"):
        load_generator(tmp_path / "ck")


def test_nothing_to_load_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_generator(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="not a bundle, checkpoint or run directory"):
        load_generator(tmp_path)


def test_a_bundle_is_never_written_over_another(tiny, bundle, tmp_path):
    with pytest.raises(BundleError, match="exists and is not empty"):
        write_bundle(bundle, bundle_files(tiny, tmp_path / "again"))
    assert verify_bundle(bundle) == []


def test_the_initial_weights_are_a_function_of_the_public_config():
    first, provenance = initial_state(from_dict(TINY))
    again, _ = initial_state(from_dict(TINY))
    other, _ = initial_state(from_dict({**TINY, "train": {"seed": 4}}))
    assert provenance is None  # no public base configured
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
