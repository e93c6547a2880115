"""The whole evaluation: real and synthetic PTB-XL folders (or a bundle) in, evaluation.json + plots out.

Three ways to get the synthetic set, one evaluation (`run`):
- `prepare_folders(real_root, synthetic_root, ...)`: two PTB-XL-format folders;
- `prepare_bundle(bundle, real_root, out_dir, ...)`: `sample_like` on the metadata of a random sample of
  real training records (labels + demographics), written to out_dir/synthetic, then as above;
- `prepare_real_vs_real(real_root, ...)`: the training folds split by patient into halves A and B; A plays
  the training set and a sample of B the "synthetic" set. This is an ideal generator that draws fresh
  real records: its numbers are the floor (or ceiling) each metric can reach on this data.

Real records in `evaluation.test_folds` form the test set (utility, Frechet reference, memorization
holdout); all other folds form the training set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config, EvaluationConfig

from . import clinical, fidelity, memorization, report, utility
from .classifier import ClassifierConfig, embed, train_or_load

logger = logging.getLogger(__name__)

# --quick: every size down so that a small bundle evaluates in minutes on two CPU cores.
QUICK = {
    "num_synthetic": 200,
    "classifier_epochs": 4,
    "classifier_min_steps": 80,
    "low_data_sizes": (100, 500),
    "max_classifier_records": 1000,
    "mia_records": 100,
    "mia_timesteps": 4,
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
    sample_steps: int | None
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
    for name in ("num_synthetic", "classifier_epochs", "mia_records", "mia_timesteps", "max_clinical_records"):
        if getattr(ev, name) < 1:
            raise ValueError(f"evaluation.{name} must be >= 1, got {getattr(ev, name)}")
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
        "sample_steps": ev.sample_steps,
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
    synthetic_root: Path | None
    pairs: np.ndarray
    pairing: str
    bundle: Path | None = None
    generator: Any = None  # common.bundle.Generator in bundle mode


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
    from common.data.ptbxl import load_dataset

    return load_dataset(_data_config(cfg, real_root), progress=progress)


def prepare_folders(real_root: str | Path, synthetic_root: str | Path, cfg: Config, settings: Settings, progress: bool = True) -> EvalData:
    from common.data.ptbxl import load_dataset

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
    from common.data.ptbxl import load_dataset
    from common.generate import sample_like
    from common.scp import SCP_CODES

    bundle, real_root, out_dir = Path(bundle), Path(real_root), Path(out_dir)
    gen = load_generator(bundle)
    if settings.sample_steps is not None:
        gen_cfg = dataclasses.replace(gen.cfg, diffusion=dataclasses.replace(gen.cfg.diffusion, sample_steps=settings.sample_steps))
        gen = dataclasses.replace(gen, cfg=gen_cfg)
    train, test = split_folds(_load_real(real_root, cfg, progress), settings.test_folds)
    n = min(settings.num_synthetic, len(train))
    rng = np.random.default_rng(settings.seed)
    chosen = np.sort(train.ecg_ids[rng.choice(len(train), n, replace=False)])
    synthetic_root = out_dir / "synthetic"
    if synthetic_root.exists() and any(synthetic_root.iterdir()):
        raise FileExistsError(f"{synthetic_root}: exists and is not empty; choose a new --out folder")
    logger.info("sampling %d synthetic records (%s steps)", n, gen.cfg.diffusion.sample_steps)
    sample_like(gen, train.meta.loc[chosen], SCP_CODES, synthetic_root, seed=settings.seed, progress=progress,
                scp_statements=real_root / "scp_statements.csv")
    synthetic = load_dataset(_data_config(cfg, synthetic_root), progress=progress)
    pairs, pairing = _pair(train, synthetic, settings.seed)
    return EvalData("bundle", real_root, train, test, synthetic, synthetic_root, pairs, pairing, bundle=bundle, generator=gen)


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


def read_stored_leads(root: Path, meta: Any, leads: tuple[str, ...]) -> np.ndarray:
    """The 12 leads as stored in the WFDB files (not re-derived), [N, 12, T] mV in `leads` order."""
    import wfdb

    out = []
    for rel in meta["filename_lr"]:
        rec = wfdb.rdrecord(str(root / rel))
        names = [str(s).upper() for s in rec.sig_name]
        missing = [name for name in leads if name.upper() not in names]
        if missing:
            raise ValueError(f"{root / rel}: leads {missing} are not stored (has {rec.sig_name})")
        out.append(rec.p_signal[:, [names.index(name.upper()) for name in leads]].T)
    return np.asarray(out, dtype=np.float32)


def _sample(n_total: int, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n, replace=False))


def run(data: EvalData, settings: Settings, out_dir: str | Path, cache_dir: str | Path | None, progress: bool = True) -> dict[str, Any]:
    """Compute every metric, write evaluation.json, the plots and report.md; return the report dict."""
    from common.data.ptbxl import LEAD_NAMES, SUPERCLASSES, Normalizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = out_dir / "plots"
    timings: dict[str, float] = {}
    plots: dict[str, str] = {}
    rng = np.random.default_rng(settings.seed)
    cls_cfg = settings.classifier()
    train, test, syn = data.train, data.test, data.synthetic
    if len(syn) < 2:
        raise ValueError(f"need at least 2 synthetic records, got {len(syn)}")

    train12, test12, syn12 = train.signals12(), test.signals12(), syn.signals12()
    real_ref_idx = _sample(len(test), len(syn), rng)  # held-out real records, as many as synthetic ones
    cls_idx = _sample(len(train), settings.max_classifier_records, rng)

    # ------------------------------------------------------------------ fidelity
    t0 = time.perf_counter()
    ilc = fidelity.interlead_correlation_error(train12, syn12)
    ilc_ref = fidelity.interlead_correlation_error(train12, test12[real_ref_idx]) if len(real_ref_idx) >= 2 else {"mean": None}
    psd = fidelity.psd_distance(train12, syn12)
    psd_ref = fidelity.psd_distance(train12, test12[real_ref_idx]) if len(real_ref_idx) >= 1 else None
    paired_real = train12[data.pairs]
    fid: dict[str, Any] = {
        "interlead_corr_error": ilc["mean"],
        "interlead_corr_error_max": ilc["max"],
        "interlead_corr_error_paired": fidelity.paired_interlead_correlation_error(paired_real, syn12),
        "interlead_corr_error_real_reference": ilc_ref["mean"],
        "interlead_corr_error_by_superclass": fidelity.interlead_correlation_error_by_class(
            train12, train.superclasses, syn12, syn.superclasses, SUPERCLASSES),
        "psd_distance_db": {"mean": float(psd.mean()), "per_lead": dict(zip(LEAD_NAMES, psd.tolist()))},
        "psd_distance_db_real_reference": float(psd_ref.mean()) if psd_ref is not None else None,
        "paired": {**fidelity.paired_rmse_snr(paired_real, syn12), "n_pairs": len(syn)},
    }
    timings["fidelity"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ utility (its TRTR model is the Frechet space)
    t0 = time.perf_counter()
    classifier_cache = Path(cache_dir) / "classifiers" if cache_dir is not None else None
    real_train_set = utility.LabelSet(train12, train.labels, train.superclasses)
    test_set = utility.LabelSet(test12, test.labels, test.superclasses)
    syn_set = utility.LabelSet(syn12, syn.labels, syn.superclasses)
    ref_model, trtr = utility.train_and_score(real_train_set.subset(cls_idx), test_set, cls_cfg, classifier_cache, progress, "TRTR")
    trtr_matched = None
    if data.pairing == "ecg_id":
        _, trtr_matched = utility.train_and_score(real_train_set.subset(np.sort(data.pairs)), test_set, cls_cfg,
                                                  classifier_cache, progress, "TRTR matched")
    _, tstr = utility.train_and_score(syn_set, test_set, cls_cfg, classifier_cache, progress, "TSTR")
    sizes = tuple(n for n in settings.low_data_sizes if n <= len(train))
    low = utility.low_data_regime(real_train_set, syn_set, test_set, sizes, cls_cfg, classifier_cache, settings.seed, progress)
    util = {"trtr": trtr, "trtr_matched": trtr_matched, "tstr": tstr, "low_data": low}
    timings["utility"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats_syn = embed(ref_model, syn12)
    feats_test = embed(ref_model, test12)
    feats_ref = embed(ref_model, train12[_sample(len(train), len(syn), rng)])
    ok = len(feats_test) >= 2
    fid["frechet_distance"] = fidelity.frechet_distance(feats_syn, feats_test) if ok else None
    fid["frechet_distance_real_reference"] = fidelity.frechet_distance(feats_ref, feats_test) if ok and len(feats_ref) >= 2 else None
    timings["frechet"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ clinical coherence
    t0 = time.perf_counter()
    clin_idx = _sample(len(train), settings.max_clinical_records, rng)
    real_table, real_beats = clinical.features_table(train12[clin_idx], progress=progress)
    syn_table, syn_beats = clinical.features_table(syn12, progress=progress)
    stored_real = read_stored_leads(data.real_root, train.meta.iloc[clin_idx[: min(len(clin_idx), 200)]], LEAD_NAMES)
    stored_syn_meta = syn.meta.iloc[: min(len(syn), 200)]
    stored_syn = read_stored_leads(data.synthetic_root, stored_syn_meta, LEAD_NAMES) if data.synthetic_root else syn12
    age_model, sex_model = clinical.train_demographic_predictors(
        train12[cls_idx], train.demographics[cls_idx, 0], train.demographics[cls_idx, 1], cls_cfg,
        str(classifier_cache) if classifier_cache else None, progress)
    clin = {
        "features": clinical.feature_distances(real_table, syn_table),
        "beats": {"real": real_beats, "synthetic": syn_beats},
        "einthoven": {"real": clinical.einthoven_consistency(stored_real), "synthetic": clinical.einthoven_consistency(stored_syn)},
        "demographics": {
            "synthetic": clinical.demographic_scores(age_model, sex_model, syn12, syn.demographics[:, 0], syn.demographics[:, 1]),
            "real_test": clinical.demographic_scores(age_model, sex_model, test12, test.demographics[:, 0], test.demographics[:, 1]),
        },
    }
    timings["clinical"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ memorization
    t0 = time.perf_counter()
    normalizer = data.generator.normalizer if data.generator is not None else Normalizer.fit(train.signals)

    def features(x8: np.ndarray):
        return memorization.distance_features(normalizer.normalize(np.asarray(x8, dtype=np.float32)))

    f_syn, f_train, f_test = features(syn.signals), features(train.signals), features(test.signals)
    nn_distances: dict[str, np.ndarray] = {}
    mem: dict[str, Any] = memorization.distance_metrics(f_syn, f_train, f_test, seed=settings.seed, distances=nn_distances)
    mem["mia"] = None
    roc = None
    if data.generator is not None:
        mem["mia"], roc = _membership(data.generator, train, test, settings, progress)
    timings["memorization"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ plots and files
    t0 = time.perf_counter()
    plots["interlead_correlation"] = report.plot_correlation(
        fidelity.lead_correlation_matrices(train12).mean(0), fidelity.lead_correlation_matrices(syn12).mean(0),
        LEAD_NAMES, plots_dir / "interlead_correlation.png")
    freqs, p_real = fidelity.welch_psd(train12)
    _, p_syn = fidelity.welch_psd(syn12)
    plots["psd"] = report.plot_psd(freqs, p_real, p_syn, LEAD_NAMES, plots_dir / "psd.png")
    plots["clinical_features"] = report.plot_features(real_table, syn_table, clinical.FEATURES, plots_dir / "clinical_features.png")
    plots["dcr"] = report.plot_dcr(nn_distances["synthetic_to_train_subset"], nn_distances["synthetic_to_holdout"],
                                   nn_distances["holdout_to_train"], mem["near_copy_threshold"], plots_dir / "dcr.png")
    if roc is not None:
        plots["mia_roc"] = report.plot_roc(*roc, mem["mia"]["mia_auc"], plots_dir / "mia_roc.png")
    plots["utility"] = report.plot_utility(util, plots_dir / "utility.png")
    from common.plotting import plot_ecg_grid

    k = min(2, len(syn))
    examples = np.concatenate([syn12[:k], paired_real[:k]])
    titles = [f"synthetic {int(syn.ecg_ids[i])}" for i in range(k)] + [
        f"real {int(train.ecg_ids[data.pairs[i]])} (its pair)" for i in range(k)]
    plots["examples"] = plot_ecg_grid(examples, plots_dir / "examples.png", titles=titles, max_records=2 * k)
    timings["plots"] = time.perf_counter() - t0

    result = {
        "schema_version": report.SCHEMA_VERSION,
        "mode": data.mode,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "inputs": {
            "real": str(data.real_root),
            "synthetic": str(data.synthetic_root) if data.synthetic_root and data.mode != "real_vs_real" else None,
            "bundle": str(data.bundle) if data.bundle else None,
            "test_folds": list(settings.test_folds),
            "n_real_train": len(train),
            "n_real_test": len(test),
            "n_synthetic": len(syn),
            "pairing": data.pairing,
        },
        "settings": settings.to_dict(),
        "fidelity": fid,
        "clinical": clin,
        "memorization": mem,
        "utility": util,
        "plots": {name: str(Path(p).relative_to(out_dir)) for name, p in plots.items()},
        "timings_s": timings,
    }
    report.write_json(result, out_dir)
    report.write_markdown(result, out_dir)
    return report.to_jsonable(result)


def _membership(gen: Any, train: Any, test: Any, settings: Settings, progress: bool) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    import torch
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(settings.seed + 1)
    n = min(settings.mia_records, len(train), len(test))
    members = train.subset(np.sort(train.ecg_ids[rng.choice(len(train), n, replace=False)]))
    nonmembers = test.subset(np.sort(test.ecg_ids[rng.choice(len(test), n, replace=False)]))
    num_t = int(gen.cfg.diffusion.timesteps)
    steps = memorization.default_timesteps(num_t, settings.mia_timesteps)

    def tensors(ds: Any):
        x0 = torch.as_tensor(gen.normalizer.normalize(ds.signals.astype(np.float32)), dtype=torch.float32)
        return x0, torch.as_tensor(ds.labels), torch.as_tensor(ds.encoded_demographics())

    model = gen.model  # scored on whatever device sampling left it
    loss_m = memorization.diffusion_losses(model, gen.diffusion, *tensors(members), timesteps=steps, seed=settings.seed, progress=progress)
    loss_n = memorization.diffusion_losses(model, gen.diffusion, *tensors(nonmembers), timesteps=steps, seed=settings.seed, progress=progress)
    out = memorization.attack_metrics(-loss_m, -loss_n)
    out["mia_loss_members_mean"] = float(loss_m.mean())
    out["mia_loss_nonmembers_mean"] = float(loss_n.mean())
    y = np.concatenate([np.ones(n), np.zeros(n)])
    fpr, tpr, _ = roc_curve(y, np.concatenate([-loss_m, -loss_n]))
    return out, (fpr, tpr)
