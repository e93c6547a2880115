"""The whole evaluation: real and synthetic PTB-XL folders (or a bundle) in, evaluation.json + plots out.

Three ways to get the synthetic set, one evaluation (`run`):
- `prepare_folders(real_root, synthetic_root, ...)`: two PTB-XL-format folders;
- `prepare_bundle(bundle, real_root, out_dir, ...)`: `sample_like` on the metadata of a random sample of
  real training records (labels + demographics), written to out_dir/synthetic, then as above;
- `prepare_real_vs_real(real_root, ...)`: the training folds split by patient into halves A and B; A plays
  the training set and a sample of B the "synthetic" set. This is an ideal generator that draws fresh
  real records: its numbers are the floor (or ceiling) each metric can reach on this data.

Real records in `evaluation.test_folds` form the test set (utility, Frechet reference, memorization
holdout); all other folds form the training set. The report's sections are computed in sections.py.

In bundle mode the membership attack draws its members from that training set. A generator trained on
only part of it (sites left out of the federation, local validation splits, data.max_records) never saw
some of those "members", which pulls the AUC towards 0.5: read it as a lower bound of the risk. Inside a
federation, `memorization.site_memorization_metrics` runs on each site's exact training records instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config, EvaluationConfig

from . import fidelity, report, sections
from .classifier import ClassifierConfig
from .markdown import write_markdown

logger = logging.getLogger(__name__)

# --quick: every size down so that a small bundle evaluates in minutes on two CPU cores.
QUICK = {
    "num_synthetic": 128,  # two sampling batches of 64
    "classifier_epochs": 4,
    "classifier_min_steps": 80,
    "low_data_sizes": (100, 500),
    "max_classifier_records": 1000,
    "mia_records": 64,
    "mia_timesteps": 4,
    "mia_noise_draws": 2,
    "sample_steps": 20,
    "max_clinical_records": 500,
}


@dataclass(frozen=True)
class Settings:
    """The evaluation sizes actually used (config, with the --quick caps applied)."""

    test_folds: tuple[int, ...]
    num_synthetic: int
    classifier_epochs: int
    classifier_min_steps: int
    low_data_sizes: tuple[int, ...]
    max_classifier_records: int | None
    mia_records: int
    mia_timesteps: int
    mia_noise_draws: int
    sample_steps: int | None
    sample_eta: float | None
    sample_guidance: float | None
    max_clinical_records: int
    seed: int
    quick: bool

    def classifier(self) -> ClassifierConfig:
        return ClassifierConfig(epochs=self.classifier_epochs, min_steps=self.classifier_min_steps, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classifier"] = dataclasses.asdict(self.classifier())
        return out


def resolve_settings(ev: EvaluationConfig, quick: bool | None = None) -> Settings:
    quick = ev.quick if quick is None else quick
    if not ev.test_folds:
        raise ValueError("evaluation.test_folds is empty: name the fold(s) held out for testing")
    for name in ("num_synthetic", "classifier_epochs", "mia_records", "mia_timesteps", "mia_noise_draws",
                 "max_clinical_records"):
        if getattr(ev, name) < 1:
            raise ValueError(f"evaluation.{name} must be >= 1, got {getattr(ev, name)}")
    if ev.sample_steps is not None and ev.sample_steps < 1:
        raise ValueError(f"evaluation.sample_steps must be >= 1 (or null for the bundle's own), got {ev.sample_steps}")
    if ev.sample_eta is not None and not 0.0 <= ev.sample_eta <= 1.0:
        raise ValueError(f"evaluation.sample_eta must lie in [0, 1] (or null for the bundle's own), got {ev.sample_eta}")
    if ev.sample_guidance is not None and ev.sample_guidance < 0:
        raise ValueError(f"evaluation.sample_guidance must be >= 0 (or null for the bundle's own), got {ev.sample_guidance}")
    if ev.max_classifier_records is not None and ev.max_classifier_records < 2:
        raise ValueError(f"evaluation.max_classifier_records must be >= 2 (or null for all), got {ev.max_classifier_records}")
    if ev.classifier_min_steps < 0:
        raise ValueError(f"evaluation.classifier_min_steps must be >= 0, got {ev.classifier_min_steps}")
    if any(n < 2 for n in ev.low_data_sizes):
        raise ValueError(f"evaluation.low_data_sizes must be >= 2 records each, got {ev.low_data_sizes}")
    values = {
        "num_synthetic": ev.num_synthetic,
        "classifier_epochs": ev.classifier_epochs,
        "classifier_min_steps": ev.classifier_min_steps,
        "low_data_sizes": tuple(ev.low_data_sizes),
        "max_classifier_records": ev.max_classifier_records,
        "mia_records": ev.mia_records,
        "mia_timesteps": ev.mia_timesteps,
        "mia_noise_draws": ev.mia_noise_draws,
        "sample_steps": ev.sample_steps,
        "sample_eta": ev.sample_eta,
        "sample_guidance": ev.sample_guidance,
        "max_clinical_records": ev.max_clinical_records,
    }
    if quick:
        for key, cap in QUICK.items():
            if key == "low_data_sizes":
                values[key] = tuple(n for n in values[key] if n <= max(cap)) or cap
            elif values[key] is None:
                values[key] = cap
            else:
                values[key] = min(values[key], cap)
    return Settings(test_folds=tuple(ev.test_folds), seed=ev.seed, quick=quick, **values)


@dataclass
class EvalData:
    """Everything the evaluation compares. `pairs[i]` indexes the real training record of synthetic i."""

    mode: str
    real_root: Path
    train: Any  # ECGDataset
    test: Any  # ECGDataset
    synthetic: Any  # ECGDataset
    synthetic_root: Path  # where the synthetic records' files are (the real folder in real_vs_real)
    pairs: np.ndarray
    pairing: str
    bundle: Path | None = None
    generator: Any = None  # common.bundle.ECGGenerator in bundle mode


def _data_config(cfg: Config, root: Path):
    return dataclasses.replace(cfg.data, root=str(root), max_records=None)


def split_folds(dataset: Any, test_folds: tuple[int, ...]) -> tuple[Any, Any]:
    is_test = np.isin(dataset.strat_fold, test_folds)
    if not is_test.any():
        present = sorted(set(dataset.strat_fold.tolist()))
        raise ValueError(f"no real records in evaluation.test_folds={list(test_folds)} (folds present: {present})")
    if is_test.all():
        raise ValueError(f"every real record is in evaluation.test_folds={list(test_folds)}: no training records left")
    return dataset.subset(dataset.ecg_ids[~is_test]), dataset.subset(dataset.ecg_ids[is_test])


def _pair(train: Any, synthetic: Any, seed: int) -> tuple[np.ndarray, str]:
    """Pair by ecg_id when every synthetic record names a real training record, else by labels."""
    position = {int(e): i for i, e in enumerate(train.ecg_ids)}
    ids = [int(e) for e in synthetic.ecg_ids]
    if all(e in position for e in ids):
        return np.array([position[e] for e in ids], dtype=np.int64), "ecg_id"
    return fidelity.label_matched_pairs(train.labels, synthetic.labels, seed), "labels"


def _load_real(real_root: Path, cfg: Config, progress: bool) -> Any:
    from common.data.dataset import load_dataset

    return load_dataset(_data_config(cfg, real_root), progress=progress)


def prepare_folders(real_root: str | Path, synthetic_root: str | Path, cfg: Config, settings: Settings, progress: bool = True) -> EvalData:
    from common.data.dataset import load_dataset

    real_root, synthetic_root = Path(real_root), Path(synthetic_root)
    train, test = split_folds(_load_real(real_root, cfg, progress), settings.test_folds)
    synthetic = load_dataset(_data_config(cfg, synthetic_root), progress=progress)
    if len(synthetic) > settings.num_synthetic:
        rng = np.random.default_rng(settings.seed)
        keep = np.sort(rng.choice(len(synthetic), settings.num_synthetic, replace=False))
        synthetic = synthetic.subset(synthetic.ecg_ids[keep])
    pairs, pairing = _pair(train, synthetic, settings.seed)
    return EvalData("folders", real_root, train, test, synthetic, synthetic_root, pairs, pairing)


def prepare_bundle(
    bundle: str | Path, real_root: str | Path, out_dir: str | Path, cfg: Config, settings: Settings, progress: bool = True
) -> EvalData:
    """Sample one synthetic record per randomly chosen real training record (its labels and demographics)."""
    from common.bundle import load_generator
    from common.data.dataset import load_dataset
    from common.generate import sample_like
    from common.scp import SCP_CODES

    bundle, real_root, out_dir = Path(bundle), Path(real_root), Path(out_dir)
    gen = load_generator(bundle)
    if settings.sample_steps is not None:
        own = gen.cfg.diffusion
        # --quick caps the bundle's own step count; an explicit evaluation.sample_steps replaces it. Fewer
        # steps than the schedule need DDIM (DDPM runs every step).
        steps = min(settings.sample_steps, own.sample_steps) if settings.quick else settings.sample_steps
        steps = min(steps, own.timesteps)
        sampler = own.sampler if steps == own.timesteps else "ddim"
        diffusion = dataclasses.replace(own, sample_steps=steps, sampler=sampler)
        gen = dataclasses.replace(gen, cfg=dataclasses.replace(gen.cfg, diffusion=diffusion))
    sampling = {"eta": settings.sample_eta, "guidance_scale": settings.sample_guidance}
    sampling = {key: value for key, value in sampling.items() if value is not None}
    if sampling:  # sampling is not training: any eta or guidance samples the same weights
        diffusion = dataclasses.replace(gen.cfg.diffusion, **sampling)
        gen = dataclasses.replace(gen, cfg=dataclasses.replace(gen.cfg, diffusion=diffusion))
    train, test = split_folds(_load_real(real_root, cfg, progress), settings.test_folds)
    n = min(settings.num_synthetic, len(train))
    rng = np.random.default_rng(settings.seed)
    chosen = np.sort(train.ecg_ids[rng.choice(len(train), n, replace=False)])
    synthetic_root = out_dir / "synthetic"
    if synthetic_root.exists() and any(synthetic_root.iterdir()):
        raise FileExistsError(f"{synthetic_root}: exists and is not empty; choose a new --out folder")
    logger.info("sampling %d synthetic records (%s, %s steps, eta %s, guidance %s)", n, gen.cfg.diffusion.sampler,
                gen.cfg.diffusion.sample_steps, gen.cfg.diffusion.eta, gen.cfg.diffusion.guidance_scale)
    sample_like(gen, train.meta.loc[chosen], SCP_CODES, synthetic_root, seed=settings.seed, progress=progress,
                scp_statements=real_root / "scp_statements.csv")
    synthetic = load_dataset(_data_config(cfg, synthetic_root), progress=progress)
    # sample_like writes fresh ids: synthetic ecg_id k was sampled like chosen[k - 1].
    position = {int(e): i for i, e in enumerate(train.ecg_ids)}
    pairs = np.array([position[int(chosen[int(e) - 1])] for e in synthetic.ecg_ids], dtype=np.int64)
    return EvalData("bundle", real_root, train, test, synthetic, synthetic_root, pairs, "ecg_id", bundle=bundle, generator=gen)


def prepare_real_vs_real(real_root: str | Path, cfg: Config, settings: Settings, progress: bool = True) -> EvalData:
    """Training folds split by patient into halves A (training set) and B (the 'synthetic' sample)."""
    real_root = Path(real_root)
    train_all, test = split_folds(_load_real(real_root, cfg, progress), settings.test_folds)
    rng = np.random.default_rng(settings.seed)
    patients = np.unique(train_all.patient_ids)
    half_b = set(rng.permutation(patients)[: len(patients) // 2].tolist())
    in_b = np.array([p in half_b for p in train_all.patient_ids])
    train = train_all.subset(train_all.ecg_ids[~in_b])
    pool = train_all.ecg_ids[in_b]
    chosen = np.sort(rng.choice(pool, min(settings.num_synthetic, len(pool)), replace=False))
    synthetic = train_all.subset(chosen)
    pairs = fidelity.label_matched_pairs(train.labels, synthetic.labels, settings.seed)
    return EvalData("real_vs_real", real_root, train, test, synthetic, real_root, pairs, "labels")


def run(data: EvalData, settings: Settings, out_dir: str | Path, cache_dir: str | Path | None, progress: bool = True) -> dict[str, Any]:
    """Compute every metric, write evaluation.json, the plots and report.md; return the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(data.synthetic) < 2:
        raise ValueError(f"need at least 2 synthetic records, got {len(data.synthetic)}")
    rng = np.random.default_rng(settings.seed)
    arrays = sections.shared_arrays(data, settings, rng)
    classifier_cache = Path(cache_dir) / "classifiers" if cache_dir is not None else None
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        timings[name] = time.perf_counter() - start
        return value

    fid = timed("fidelity", sections.fidelity_metrics, data, arrays)
    util, ref_model = timed("utility", sections.utility_metrics, data, arrays, settings, classifier_cache, progress)
    fid.update(timed("frechet", sections.frechet_metrics, ref_model, arrays, rng))
    clin = timed("clinical", sections.clinical_metrics, data, arrays, settings, classifier_cache, rng, progress)
    mem = timed("memorization", sections.memorization_metrics, data, settings, progress)
    written = timed("plots", sections.write_plots, data, arrays, util, clin, mem, out_dir / "plots")

    result = {
        "schema_version": report.SCHEMA_VERSION,
        "mode": data.mode,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "inputs": _inputs(data, settings),
        "settings": settings.to_dict(),
        "fidelity": fid,
        "clinical": clin.metrics,
        "memorization": mem.metrics,
        "utility": util,
        "plots": {name: str(Path(p).relative_to(out_dir)) for name, p in written.items()},
        "timings_s": timings,
    }
    report.write_json(result, out_dir)
    write_markdown(result, out_dir)
    return report.to_jsonable(result)


def _inputs(data: EvalData, settings: Settings) -> dict[str, Any]:
    """What was compared: the folders (or bundle), the test folds, the set sizes and how records were paired."""
    return {
        "real": str(data.real_root),
        "synthetic": str(data.synthetic_root) if data.mode != "real_vs_real" else None,
        "bundle": str(data.bundle) if data.bundle else None,
        "test_folds": list(settings.test_folds),
        "n_real_train": len(data.train),
        "n_real_test": len(data.test),
        "n_synthetic": len(data.synthetic),
        "pairing": data.pairing,
    }
