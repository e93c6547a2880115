"""Checkpoints and the release bundle: safetensors weights plus JSON/YAML, never pickles.

A checkpoint directory holds `model.safetensors` (the weights to sample from) and `checkpoint.json`
(resolved config, its hash, normalization statistics, progress). A bundle is a self-contained release:

    model.safetensors  config.yaml  normalization.json  privacy.json  [evaluation.json]
    [expert.safetensors  expert.json]  (the public high-noise expert of diffusion.expert; common/expert.py)
    MODEL_CARD.md  manifest.json (SHA256 of every other file; which files lie outside the DP guarantee)

`load_generator` accepts a bundle, a checkpoint or a run directory, and refuses a bundle whose files do
not match its manifest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from common.config import Config, config_hash, from_dict, to_dict
from common.diffusion import GaussianDiffusion
from common.hashing import sha256_file
from common.model.denoiser import build_denoiser
from common.normalization import Normalizer
from common.rhythm import RhythmTable
from common.run_dir import CHECKPOINTS, read_latest

BUNDLE_FORMAT = "fedecg-bundle/1"
CHECKPOINT_FORMAT = "fedecg-checkpoint/1"
WEIGHTS = "model.safetensors"
RHYTHM_JSON = "rhythm.json"  # a rhythm-conditioned checkpoint's public rhythm table (common/rhythm.py)
# What a certificate and a model card say of a public model (base or expert), from its base.json.
PROVENANCE_KEYS = ("trained_on", "records", "patients", "steps", "weights_sha256", "config_sha256")


def provenance_of(record: dict[str, Any]) -> dict[str, Any]:
    """The PROVENANCE_KEYS of a public model's base.json (or a bundle's expert.json), and the hash of its
    rhythm table where it has one."""
    optional = {"rhythm_sha256": record["rhythm_sha256"]} if record.get("rhythm_sha256") else {}
    return {k: record[k] for k in PROVENANCE_KEYS} | optional


class BundleError(ValueError):
    """A bundle or checkpoint that is incomplete, tampered with or of an unknown format."""


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def save_checkpoint(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    cfg: Config,
    normalizer: Normalizer,
    progress: dict[str, Any],
    rhythm: RhythmTable | None = None,
) -> Path:
    """Write weights and their metadata atomically enough: weights first, JSON (the marker) last. A
    rhythm-conditioned model's checkpoint carries the public rhythm table it samples with (RHYTHM_JSON)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if cfg.model.rhythm != (rhythm is not None):
        raise ValueError("save_checkpoint: a rhythm-conditioned model needs its rhythm table, others take none")
    save_weights(directory / WEIGHTS, state)
    if rhythm is not None:
        (directory / RHYTHM_JSON).write_bytes(rhythm.to_bytes())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(cfg),
        "config_sha256": config_hash(cfg),
        "normalization": normalizer.to_dict(),
        "progress": progress,
        "weights_sha256": sha256_file(directory / WEIGHTS),
    }
    if rhythm is not None:
        meta["rhythm_sha256"] = sha256_file(directory / RHYTHM_JSON)
    (directory / "checkpoint.json").write_text(json.dumps(meta, indent=2))
    return directory


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], Config, Normalizer, dict[str, Any]]:
    directory = Path(directory)
    meta_path = directory / "checkpoint.json"
    if not meta_path.is_file():
        raise BundleError(f"{directory}: no checkpoint.json (not a fedecg checkpoint)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BundleError(f"{meta_path}: unknown format {meta.get('format')!r}")
    if sha256_file(directory / WEIGHTS) != meta["weights_sha256"]:
        raise BundleError(f"{directory / WEIGHTS}: checksum does not match checkpoint.json")
    cfg = from_dict(meta["config"], source=str(meta_path))
    return load_weights(directory / WEIGHTS), cfg, Normalizer.from_dict(meta["normalization"]), meta["progress"]


@dataclass
class ECGGenerator:
    """Everything needed to sample ECGs: config, denoiser (eval mode), schedule and normalization.

    Named apart from torch.Generator, the random-number stream the samplers also take."""

    cfg: Config
    model: nn.Module
    diffusion: GaussianDiffusion
    normalizer: Normalizer
    source: Path
    expert: Any = None  # a common.expert.PublicExpert when diffusion.expert is set: the high-noise sampling steps
    rhythm: RhythmTable | None = None  # the table its rhythm-conditioned network draws beat times from (public)

    def sampling_model(self) -> nn.Module:
        """The network the sampler calls (with the expert, when there is one)."""
        from common.expert import sampling_denoiser

        return sampling_denoiser(self.model, self.diffusion, self.expert)

    def rhythm_table(self) -> RhythmTable | None:
        """Where the sampler draws beat times from: the table of whichever sampling network reads a beat map."""
        if self.rhythm is not None:
            return self.rhythm
        return None if self.expert is None else self.expert.rhythm


def build_generator(cfg: Config, state: dict[str, torch.Tensor], normalizer: Normalizer, source: Path,
                    expert: Any = None, rhythm: RhythmTable | None = None) -> ECGGenerator:
    """The generator of `state`; its expert is `expert`, else loaded from diffusion.expert when set. A
    rhythm-conditioned model needs its `rhythm` table."""
    if cfg.model.rhythm != (rhythm is not None):
        raise BundleError(f"{source}: a rhythm-conditioned model samples with its rhythm table, others take none")
    model = build_denoiser(cfg.model)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshapen = [f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
                 for name in sorted(set(expected) & set(state)) if state[name].shape != expected[name].shape]
    if missing or unexpected or misshapen:
        raise BundleError(f"{source}: weights do not fit the configured model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, shapes differ: {misshapen[:3]})")
    model.load_state_dict(state)
    model.eval()
    diffusion = GaussianDiffusion(cfg.diffusion)
    if expert is None and cfg.diffusion.expert:
        from common.expert import load_expert_run

        expert = load_expert_run(cfg.diffusion.expert, cfg, normalizer)
    return ECGGenerator(cfg=cfg, model=model, diffusion=diffusion, normalizer=normalizer, source=source, expert=expert,
                        rhythm=rhythm)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    name = read_latest(run_dir)
    if name is not None:
        target = Path(run_dir) / CHECKPOINTS / name
        if (target / "checkpoint.json").is_file():
            return target
    return None


def load_generator(path: str | Path) -> ECGGenerator:
    """Load from a bundle (checksums verified), a checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: does not exist")
    if (path / "manifest.json").is_file():
        problems = verify_bundle(path)
        if problems:
            raise BundleError(f"{path}: bundle failed verification: " + "; ".join(problems))
        cfg = from_dict(yaml.safe_load((path / "config.yaml").read_text()), source=str(path / "config.yaml"))
        normalizer = Normalizer.from_dict(json.loads((path / "normalization.json").read_text()))
        return build_generator(cfg, load_weights(path / WEIGHTS), normalizer, path, expert=_bundled_expert(path, cfg))
    if not (path / "checkpoint.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise BundleError(f"{path}: not a bundle, checkpoint or run directory with checkpoints")
        path = latest
    state, cfg, normalizer, _ = read_checkpoint(path)
    return build_generator(cfg, state, normalizer, path, rhythm=checkpoint_rhythm(path))


def checkpoint_rhythm_sha256(directory: Path) -> str | None:
    """The hash of the rhythm table checkpoint.json records, or None for a model without one."""
    return json.loads((Path(directory) / "checkpoint.json").read_text()).get("rhythm_sha256")


def checkpoint_rhythm(directory: Path) -> RhythmTable | None:
    """The rhythm table a checkpoint carries (checked against checkpoint.json), or None."""
    sha256 = checkpoint_rhythm_sha256(directory)
    return None if not sha256 else read_rhythm_table(directory / RHYTHM_JSON, sha256)


def read_rhythm_table(path: Path, sha256: str) -> RhythmTable:
    """A checkpoint's or bundle's rhythm table, refused (BundleError) unless it has exactly that hash."""
    try:
        return RhythmTable.read(path, sha256)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path.parent}: {err}") from err


def _bundled_expert(path: Path, cfg: Config) -> Any:
    """A bundle samples with the expert it carries, never with one found at the config's path."""
    from common.expert import EXPERT_WEIGHTS, load_expert_files

    carried = (path / EXPERT_WEIGHTS).is_file()
    if bool(cfg.diffusion.expert) != carried:
        raise BundleError(f"{path}: its config {'names' if cfg.diffusion.expert else 'names no'} diffusion.expert, "
                          f"but the bundle {'carries one' if carried else 'carries none'}")
    return load_expert_files(path) if carried else None


# How a model is sampled is not how it was trained: a base stays usable under another sampler or step count.
SAMPLING_KEYS = ("sampler", "sample_steps", "eta", "guidance_scale", "expert", "expert_from")


def _trained_part(section: str, values: dict[str, Any] | None) -> dict[str, Any] | None:
    if section != "diffusion" or values is None:
        return values
    return {k: v for k, v in values.items() if k not in SAMPLING_KEYS}


def public_run(path: str | Path, cfg: Config, key: str) -> tuple[Path, dict[str, Any]]:
    """The final checkpoint and base.json of a `fedecg pretrain` run named by config `key`, checked: its
    weights are the ones base.json describes, and its public pool is exactly the one this partition excludes
    from the federation (same partition section), so no federated patient was trained on."""
    path = Path(path)
    if not (path / "base.json").is_file():
        raise BundleError(f"{key}={path}: no base.json there; make one with `fedecg pretrain`")
    base = json.loads((path / "base.json").read_text())
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise BundleError(f"{key}={path}: no checkpoint")
    if sha256_file(checkpoint / WEIGHTS) != base["weights_sha256"]:
        raise BundleError(f"{key}={path}: the weights are not the ones base.json describes")
    if base["partition"] != to_dict(cfg)["partition"]:
        raise BundleError(
            f"{key}={path}: it was pretrained under another partition section; its public pool "
            "must be exactly the one this federation excludes (partition.public_sites)"
        )
    return checkpoint, base


def load_public_base(path: str | Path, cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and provenance (base.json) of a `fedecg pretrain` run, checked against `cfg`: a public
    run (`public_run`) of the configured architecture, trained for the same noise process."""
    checkpoint, base = public_run(path, cfg, "federation.init_from")
    plain, defaults = to_dict(cfg), to_dict(Config())
    for section in ("model", "diffusion"):
        # A key the base's version did not have yet holds its default, the behaviour that version had.
        recorded = {**defaults[section], **base[section]} if section in base else None
        if _trained_part(section, recorded) != _trained_part(section, plain[section]):
            raise BundleError(f"federation.init_from={path}: the base's {section} section differs from this config's")
    state, _, _, _ = read_checkpoint(checkpoint)
    return state, provenance_of(base)


def initial_state(cfg: Config) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A federated run's starting weights, a function of the public config: the public base
    (federation.init_from) with its provenance, else the initialization seeded by train.seed."""
    if cfg.federation.init_from:
        return load_public_base(cfg.federation.init_from, cfg)
    torch.manual_seed(cfg.train.seed)
    return {k: v.detach().cpu() for k, v in build_denoiser(cfg.model).state_dict().items()}, None


def verify_bundle(path: str | Path) -> list[str]:
    """Check every file against manifest.json; return the problems found (empty: intact)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"{path}: no manifest.json"]
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        return [f"unknown bundle format {manifest.get('format')!r}"]
    problems = []
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(file) != expected:
            problems.append(f"{name}: SHA256 mismatch (corrupted or modified)")
    for required in (WEIGHTS, "config.yaml", "normalization.json", "MODEL_CARD.md"):
        if required not in manifest["files"]:
            problems.append(f"{required}: not listed in the manifest")
    from common.expert import EXPERT_JSON, EXPERT_RHYTHM, EXPERT_WEIGHTS

    for name in (EXPERT_WEIGHTS, EXPERT_JSON, EXPERT_RHYTHM):  # the loader samples with these whenever present
        if (path / name).exists() and name not in manifest["files"]:
            problems.append(f"{name}: present but not listed in the manifest")
    return problems


def write_bundle(out: str | Path, files: dict[str, bytes | Path], outside_dp_guarantee: dict[str, str] | None = None) -> Path:
    """Write the given files (bytes or paths to copy) and a manifest of their SHA256 sums.

    `outside_dp_guarantee` names files released outside the DP mechanism, with the reason.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out}: exists and is not empty; choose a new bundle directory")
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = out / name
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    manifest = {
        "format": BUNDLE_FORMAT,
        "files": {name: sha256_file(out / name) for name in sorted(files)},
        "outside_dp_guarantee": dict(outside_dp_guarantee or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
