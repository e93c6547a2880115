"""One YAML file is the source of truth: typed, frozen sections, strict keys, dotted overrides.

    cfg = load("configs/quickstart.yaml", ["privacy.target_epsilon=4", "federation.rounds=5"])
    cfg.privacy.target_epsilon  # 4.0

Unknown keys and wrong types are errors that name the key and the file. The resolved config and its
hash go into every run directory, checkpoint and bundle (`to_dict`, `config_hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config_federation import FederationConfig


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # PTB-XL root; falls back to $PTBXL_DIR
    sampling_rate: int = 100  # only 100 is accepted (see _ONLY); 500 Hz records are resampled to it
    on_bad_record: str = "error"  # error | skip
    cache_dir: str = ".cache/fedecg"  # relative paths resolve against the working directory
    max_records: int | None = None  # first N rows of the metadata (by ecg_id), for quick runs


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = "site"  # site | iid | dirichlet | age
    num_sites: int = 3
    seed: int = 0
    rest: str = "drop"  # site scheme: records outside the K largest sites: drop | merge
    alpha: float = 0.5  # dirichlet concentration
    age_bands: tuple[float, ...] = (45.0, 65.0)  # age scheme: cut points, num_sites = len + 1
    train_folds: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    val_folds: tuple[int, ...] = (9,)
    test_folds: tuple[int, ...] = (10,)
    local_val_fraction: float = 0.1  # share of each site's patients kept for local validation
    public_sites: tuple[int, ...] = ()  # site scheme: PTB-XL sites declared public (pretraining pool), never federated


@dataclass(frozen=True)
class ModelConfig:
    size: str = "tiny"  # tiny | small | sssd (SSSD stacks) | unet (multi-scale); fields below override the preset
    channels: int | None = None
    blocks: int | None = None
    state_dim: int | None = None
    bidirectional: bool | None = None
    s4_levels: tuple[int, ...] | None = None  # unet: levels (0 finest) with an S4 layer; must include the coarsest
    attention_levels: tuple[int, ...] | None = None  # unet: levels with self-attention (rotary positions)
    cond_dropout: float = 0.1  # probability of dropping all conditioning (classifier-free guidance)
    activation_checkpointing: bool = False
    rhythm: bool = False  # unet: also read a beat map (common/rhythm.py); public pretraining only

    def problems(self) -> list[str]:
        if self.rhythm and self.size != "unet":
            return [f"rhythm conditioning needs size unet, got {self.size!r}"]
        return []


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 200
    schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    prediction: str = "eps"  # eps | v | blend: what the denoiser outputs (v = sqrt(abar) eps - sqrt(1 - abar) x0;
    # blend: eps at low noise, v at high noise; common/diffusion.py)
    min_snr_gamma: float = 0.0  # > 0: weight each step's loss as min(SNR, gamma) on x0 (Hang et al. 2023)
    zero_terminal_snr: bool = False  # rescale the schedule so the last step holds no signal (needs prediction v or blend)
    # [first, last) timesteps drawn in training (None: all T): an expert for one noise range (eDiff-I)
    train_timesteps: tuple[int, ...] | None = None
    # A `fedecg pretrain` run of a public denoiser that answers the sampling steps t >= expert_from (t on this
    # schedule); this network answers the rest. Sampling only: it never trains, nor sees a site's record.
    expert: str | None = None
    expert_from: int = 100


@dataclass(frozen=True)
class MidtConfig:
    enabled: bool = True
    weight: float = 0.02
    n_fft: tuple[int, ...] = (64,)
    hop_length: tuple[int, ...] = (16,)
    n_mels: int = 16
    f_min: float = 0.0
    f_max: float = 50.0
    target: str = "posterior_mean"  # posterior_mean | x0
    noise_multiplicity: int = 1  # K (noise, timestep) draws averaged per example before clipping


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # expected (DP: Poisson) examples per optimizer step
    # > 0: run each batch in forward/backward passes of at most this many examples, one optimizer step per
    # batch (virtual steps: memory bounded by the pass, DP accounting by the whole batch); 0: one pass
    max_physical_batch_size: int = 0
    steps: int = 100  # central training steps; federated runs use federation.local_steps
    lr: float = 2e-4
    warmup_steps: int = 0  # central and pretraining runs: linear warm-up of the learning rate
    lr_decay: str = "none"  # central and pretraining runs: none | cosine (to zero at train.steps)
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # non-private runs only; DP clips per sample
    mixed_precision: bool = True  # bf16 autocast on CUDA only
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # central: write a sample grid every N steps (0: only at the end)
    num_samples: int = 4

    def problems(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be positive, got {self.batch_size}")
        if self.max_physical_batch_size < 0:
            problems.append(f"max_physical_batch_size must be >= 0 (0: no split), got {self.max_physical_batch_size}")
        return problems


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 10.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated so the plan spends the target (replace-one)
    lifetime_epsilon: float | None = None  # cap on a site's spend over all runs on the same records (None: target)
    unit: str = "record"  # record | patient
    grad_sample_mode: str = "hooks"  # hooks | functorch | ghost


@dataclass(frozen=True)
class EvaluationConfig:
    test_folds: tuple[int, ...] = (9,)  # the shared subset has no fold 10
    num_synthetic: int = 500
    quick: bool = False
    classifier_epochs: int = 10
    seed: int = 0
    classifier_min_steps: int = 200  # optimizer steps at least, so small training sets (low-data, TSTR) still converge
    low_data_sizes: tuple[int, ...] = (100, 500, 1000)  # real subset sizes of the low-data utility experiment
    max_classifier_records: int | None = None  # cap on real records for the reference/demographic CNNs (None: all)
    mia_records: int = 500  # members and as many non-members scored by the membership-inference attack
    mia_timesteps: int = 8  # fixed diffusion timesteps averaged per record by the loss attack
    mia_noise_draws: int = 4  # noise draws per timestep (the gap hides in the noise's own variance at one draw)
    sample_steps: int | None = None  # sampler steps for the synthetic set (None: the bundle's diffusion.sample_steps)
    sample_eta: float | None = None  # DDIM stochasticity for the synthetic set (None: the bundle's diffusion.eta)
    sample_guidance: float | None = None  # classifier-free guidance scale for the synthetic set (None: the bundle's)
    max_clinical_records: int = 2000  # real records delineated for the clinical comparison
    site_records: int = 64  # federated runs: records per site for the site-side memorization check (0: skip)


@dataclass(frozen=True)
class AuditConfig:
    pairs_per_site: int = 0  # canary slots planted at every site (0: no audit); see common/privacy/audit.py
    kinds: tuple[str, ...] = ("ood", "relabelled")  # slot i is of kind kinds[i % len(kinds)]
    seed: int = 0  # public: the candidates; the coins choosing which candidate trains are each site's secret
    timesteps: int = 8  # diffusion timesteps averaged by the canary score
    noise_draws: int = 4  # noise draws per timestep
    guess_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # shares of slots guessed, Bonferroni over them
    confidence: float = 0.95


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    name: str = "run"
    checkpoint_every: int = 1


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    midt: MidtConfig = field(default_factory=MidtConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


_CHOICES = {
    ("data", "on_bad_record"): {"error", "skip"},
    ("partition", "scheme"): {"site", "iid", "dirichlet", "age"},
    ("partition", "rest"): {"drop", "merge"},
    ("model", "size"): {"tiny", "small", "sssd", "unet"},
    ("diffusion", "schedule"): {"linear", "cosine"},
    ("diffusion", "sampler"): {"ddim", "ddpm"},
    ("diffusion", "prediction"): {"eps", "v", "blend"},
    ("midt", "target"): {"posterior_mean", "x0"},
    ("train", "device"): {"auto", "cpu", "cuda"},
    ("train", "lr_decay"): {"none", "cosine"},
    ("privacy", "unit"): {"record", "patient"},
    ("privacy", "grad_sample_mode"): {"hooks", "functorch", "ghost"},
    ("federation", "strategy"): {"fedavg", "fedprox", "fedadam"},
}


# Values that look plausible but cannot work, with the reason.
_REFUSED = {
    ("privacy", "grad_sample_mode"): {
        "ew": "Opacus' expanded-weights mode (torch ExpandedWeights) cannot differentiate the S4D kernel "
              "(it fails on torch.exp in the first step); use hooks (with the S4D grad sampler), functorch or ghost",
    },
}

# Keys with a single working value, and why: the key is kept so that configs state it explicitly.
_ONLY = {
    ("data", "sampling_rate"): (
        100, "the model, sampler and evaluation run at 100 Hz, 1000 samples; 500 Hz records are resampled "
             "to 100 Hz by the loader"),
}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a dataclass field annotation; convert only lossless cases (int->float, list->tuple)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {annotation!r}")


def _section_types() -> dict[str, type]:
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _build(raw: dict[str, Any], source: str) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(hints)})")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        cls = hints[name]
        field_types = typing.get_type_hints(cls)
        kwargs = {}
        for key, val in value.items():
            if key not in field_types:
                raise ConfigError(
                    f"{source}: unknown key '{name}.{key}' (known: {', '.join(field_types)})"
                )
            where = f"{source}: {name}.{key}"
            kwargs[key] = _coerce(val, field_types[key], where)
            if (name, key) in _REFUSED and kwargs[key] in _REFUSED[(name, key)]:
                raise ConfigError(f"{where}: {kwargs[key]!r} is refused: {_REFUSED[(name, key)][kwargs[key]]}")
            if (name, key) in _ONLY and kwargs[key] != _ONLY[(name, key)][0]:
                only, reason = _ONLY[(name, key)]
                raise ConfigError(f"{where}: {kwargs[key]!r} is refused, only {only!r} works: {reason}")
            choices = _CHOICES.get((name, key))
            if choices and kwargs[key] not in choices:
                raise ConfigError(f"{where}: {kwargs[key]!r} is not one of {sorted(choices)}")
        section = cls(**kwargs)
        problems = section.problems() if hasattr(section, "problems") else []
        if problems:
            raise ConfigError(f"{source}: {name}: " + "; ".join(problems))
        sections[name] = section
    return Config(**sections)


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected section.key=value")
    dotted, value_text = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}': expected section.key=value")
    # YAML parsing gives the same types as the file: 4 -> int, 1e-5 -> float, [1,2] -> list, null -> None.
    value = yaml.safe_load(value_text) if value_text.strip() else ""
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)
    return parts[0], parts[1], value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "<dict>") -> Config:
    merged = json.loads(json.dumps(raw or {}))  # deep copy
    for text in overrides:
        section, key, value = _parse_override(text)
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][key] = value
    where = source if not overrides else f"{source} (with --set {', '.join(overrides)})"
    return _build(merged, where)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return from_dict(raw, overrides, source=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in _section_types()
    }


def config_hash(cfg: Config) -> str:
    """SHA256 of the resolved config without the keys at their default value.

    Leaving defaults out keeps the hash of a config written before a key (or section) was added with a
    default that keeps the old behaviour: certificates and bundles issued then still verify.
    """
    defaults = to_dict(Config())
    changed = {name: {k: v for k, v in section.items() if v != defaults[name][k]} for name, section in to_dict(cfg).items()}
    canonical = json.dumps({name: keys for name, keys in changed.items() if keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def hash_matches(raw: dict[str, Any], sha256: str | None) -> bool:
    """Whether `sha256` names this resolved config dict (`raw`, as embedded in a certificate or config.yaml):
    by `config_hash`, or by the full-dict hash that releases before it used."""
    full = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return sha256 in (config_hash(from_dict(raw)), hashlib.sha256(full.encode()).hexdigest())


def save(cfg: Config, directory: str | Path) -> Path:
    """Write the resolved config (YAML) and its hash into an output directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "config.yaml"
    text = f"# resolved fedecg config, sha256 {config_hash(cfg)}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    out.write_text(text)
    return out


@dataclass(frozen=True)
class RunSpec:
    """What a Flower app needs to find its config: carried in run_config (`flwr run`) or bound by `fedecg simulate`."""

    config_path: str
    overrides: tuple[str, ...] = ()
    run_dir: str = ""
    resume: bool = False
    until_round: int = 0  # stop (with a checkpoint) after this round; 0 runs to the end
    site_registry: str = ""  # JSON site name -> node id (server/site_registry.py); "" trusts the names sites report

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunSpec":
        if "config-path" not in run_config:
            raise ConfigError("run_config has no 'config-path' (set it in pyproject's [tool.flwr.app.config])")
        overrides = str(run_config.get("overrides", "") or "")
        return cls(
            config_path=str(run_config["config-path"]),
            overrides=tuple(o.strip() for o in overrides.split(";") if o.strip()),
            run_dir=str(run_config.get("run-dir", "") or ""),
            resume=bool(run_config.get("resume", False)),
            until_round=int(run_config.get("until-round", 0) or 0),
            site_registry=str(run_config.get("site-registry", "") or ""),
        )

    def to_run_config(self) -> dict[str, Any]:
        return {
            "config-path": self.config_path,
            "overrides": ";".join(self.overrides),
            "run-dir": self.run_dir,
            "resume": self.resume,
            "until-round": self.until_round,
            "site-registry": self.site_registry,
        }

    def load(self) -> Config:
        return load(self.config_path, self.overrides)
