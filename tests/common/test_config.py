"""Config: typed, frozen, strict, overridable, and written with its hash into output directories."""

from pathlib import Path

import pytest
import yaml

from common.config import Config, ConfigError, RunSpec, config_hash, from_dict, load, save, to_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_types_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("privacy:\n  target_epsilon: 4\n  delta: 1.0e-6\nfederation:\n  rounds: 2\n")
    cfg = load(path, ["federation.rounds=5", "partition.train_folds=[1,2]", "privacy.noise_multiplier=1.5"])
    assert cfg.privacy.target_epsilon == 4.0 and isinstance(cfg.privacy.target_epsilon, float)
    assert cfg.federation.rounds == 5
    assert cfg.partition.train_folds == (1, 2)
    assert cfg.privacy.noise_multiplier == 1.5
    with pytest.raises(Exception):
        cfg.privacy.delta = 0.1  # frozen


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("privacy:\n  target_epsilonn: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*privacy\.target_epsilonn"):
        load(path)


def test_unknown_section_and_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("privcy:\n  delta: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'privcy'"):
        load(path)
    path.write_text("federation:\n  rounds: three\n")
    with pytest.raises(ConfigError, match=r"federation\.rounds: expected an integer"):
        load(path)
    path.write_text("privacy:\n  unit: hospital\n")
    with pytest.raises(ConfigError, match="unit"):
        load(path)
    # A mode that looks valid but cannot work is refused with the reason, not left to fail mid-run.
    path.write_text("privacy:\n  grad_sample_mode: ew\n")
    with pytest.raises(ConfigError, match="refused: .*ExpandedWeights"):
        load(path)
    with pytest.raises(ConfigError, match=r"train\.steps"):
        from_dict({}, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        from_dict({}, ["rounds=3"])


def test_only_100_hz_is_accepted_because_everything_downstream_runs_at_100_hz(tmp_path):
    assert from_dict({"data": {"sampling_rate": 100}}).data.sampling_rate == 100
    path = tmp_path / "hr.yaml"
    path.write_text("data:\n  sampling_rate: 500\n")
    with pytest.raises(ConfigError, match=r"hr\.yaml: data\.sampling_rate: 500 is refused, only 100 works: .*resampled"):
        load(path)
    with pytest.raises(ConfigError, match="data.sampling_rate: 250 is refused"):
        from_dict({}, ["data.sampling_rate=250"])


def test_save_writes_resolved_config_with_hash(tmp_path):
    cfg = from_dict({"model": {"size": "small"}})
    out = save(cfg, tmp_path)
    text = out.read_text()
    assert config_hash(cfg) in text
    assert from_dict(yaml.safe_load(text)) == cfg
    assert config_hash(from_dict(to_dict(cfg))) == config_hash(cfg)
    assert config_hash(from_dict({"model": {"size": "tiny"}})) != config_hash(cfg)
    # A config written before a section existed (here: audit, at its default) keeps its hash, so the
    # certificates issued for it still verify; setting the new key changes it.
    older = {name: section for name, section in to_dict(cfg).items() if name != "audit"}
    assert config_hash(from_dict(older)) == config_hash(cfg)
    assert config_hash(from_dict(older, ["audit.pairs_per_site=8"])) != config_hash(cfg)


def test_hash_matches_the_current_and_the_earlier_full_dict_hash():
    import hashlib
    import json

    from common.config import hash_matches

    raw = to_dict(from_dict({"model": {"size": "tiny"}}))
    legacy = hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert hash_matches(raw, config_hash(from_dict(raw))) and hash_matches(raw, legacy)
    tampered = {**raw, "privacy": {**raw["privacy"], "target_epsilon": 100.0}}
    assert not hash_matches(tampered, config_hash(from_dict(raw))) and not hash_matches(tampered, legacy)


def test_run_spec_round_trip():
    spec = RunSpec("configs/quickstart.yaml", ("federation.rounds=2", "train.lr=0.01"), "runs/x", resume=True, until_round=1)
    assert RunSpec.from_run_config(spec.to_run_config()) == spec
    with pytest.raises(ConfigError, match="config-path"):
        RunSpec.from_run_config({})


@pytest.mark.parametrize("name", ["quickstart", "quality_cpu"])
def test_the_demo_and_quality_recipes_start_from_the_shipped_public_base(name):
    from common.bundle import load_public_base
    from common.model.denoiser import build_denoiser

    cfg = load(ROOT / "configs" / f"{name}.yaml")
    state, base = load_public_base(ROOT / cfg.federation.init_from, cfg)  # hash, model, noise process, public pool
    build_denoiser(cfg.model).load_state_dict(state)  # strict: every weight fits the configured network
    assert cfg.partition.public_sites == (0,) and "sites [0]" in base["trained_on"] and base["steps"] > 0
