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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config, EvaluationConfig

from . import clinical, fidelity, memorization, plots, report, utility
from .classifier import ClassifierConfig, embed
from .markdown import write_markdown

logger = logging.getLogger(__name__)

EINTHOVEN_RECORDS = 200  # records per set read back from their files for the lead-system check

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


def _sample(n_total: int, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n, replace=False))


@dataclass
class _Arrays:
    """The 12-lead arrays and record samples every section shares."""

    train12: np.ndarray
    test12: np.ndarray
    syn12: np.ndarray
    paired_real12: np.ndarray  # the real training record paired with each synthetic one
    real_reference: np.ndarray  # indices of held-out test records, as many as synthetic records
    classifier_records: np.ndarray  # indices of the training records the CNNs learn from


@dataclass
class _Clinical:
    metrics: dict[str, Any]
    feature_tables: tuple[np.ndarray, np.ndarray]  # per-record features (real, synthetic), for the plot


@dataclass
class _Memorization:
    metrics: dict[str, Any]
    distances: dict[str, np.ndarray]  # nearest-neighbour distances, for the DCR plot
    roc: tuple[np.ndarray, np.ndarray] | None  # (fpr, tpr) of the loss attack; None without a generator


def run(data: EvalData, settings: Settings, out_dir: str | Path, cache_dir: str | Path | None, progress: bool = True) -> dict[str, Any]:
    """Compute every metric, write evaluation.json, the plots and report.md; return the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(data.synthetic) < 2:
        raise ValueError(f"need at least 2 synthetic records, got {len(data.synthetic)}")
    rng = np.random.default_rng(settings.seed)
    train12 = data.train.signals12()
    arrays = _Arrays(
        train12=train12,
        test12=data.test.signals12(),
        syn12=data.synthetic.signals12(),
        paired_real12=train12[data.pairs],
        real_reference=_sample(len(data.test), len(data.synthetic), rng),
        # its own generator: the same real records (hence the same cached CNNs) whatever is evaluated
        classifier_records=_sample(len(data.train), settings.max_classifier_records, np.random.default_rng([settings.seed, 1])),
    )
    classifier_cache = Path(cache_dir) / "classifiers" if cache_dir is not None else None
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        start = time.perf_counter()
        value = fn(*args)
        timings[name] = time.perf_counter() - start
        return value

    fid = timed("fidelity", _fidelity, data, arrays)
    util, ref_model = timed("utility", _utility, data, arrays, settings, classifier_cache, progress)
    fid.update(timed("frechet", _frechet, ref_model, arrays, rng))
    clin = timed("clinical", _clinical, data, arrays, settings, classifier_cache, rng, progress)
    mem = timed("memorization", _memorization, data, settings, progress)
    written = timed("plots", _plots, data, arrays, util, clin, mem, out_dir / "plots")

    result = {
        "schema_version": report.SCHEMA_VERSION,
        "mode": data.mode,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "inputs": {
            "real": str(data.real_root),
            "synthetic": str(data.synthetic_root) if data.mode != "real_vs_real" else None,
            "bundle": str(data.bundle) if data.bundle else None,
            "test_folds": list(settings.test_folds),
            "n_real_train": len(data.train),
            "n_real_test": len(data.test),
            "n_synthetic": len(data.synthetic),
            "pairing": data.pairing,
        },
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


def _fidelity(data: EvalData, a: _Arrays) -> dict[str, Any]:
    from common.data.labels import SUPERCLASSES
    from common.data.leads import LEAD_NAMES

    ilc = fidelity.interlead_correlation_error(a.train12, a.syn12)
    reference = a.test12[a.real_reference]
    psd = fidelity.psd_distance(a.train12, a.syn12)
    return {
        "interlead_corr_error": ilc["mean"],
        "interlead_corr_error_max": ilc["max"],
        "interlead_corr_error_paired": fidelity.paired_interlead_correlation_error(a.paired_real12, a.syn12),
        "interlead_corr_error_real_reference":
            fidelity.interlead_correlation_error(a.train12, reference)["mean"] if len(reference) >= 2 else None,
        "interlead_corr_error_by_superclass": fidelity.interlead_correlation_error_by_class(
            a.train12, data.train.superclasses, a.syn12, data.synthetic.superclasses, SUPERCLASSES),
        "psd_distance_db": {"mean": float(psd.mean()), "per_lead": dict(zip(LEAD_NAMES, psd.tolist()))},
        "psd_distance_db_real_reference": float(fidelity.psd_distance(a.train12, reference).mean()),
        "paired": {**fidelity.paired_rmse_snr(a.paired_real12, a.syn12), "n_pairs": len(a.syn12)},
    }


def _utility(data: EvalData, a: _Arrays, settings: Settings, cache: Path | None, progress: bool) -> tuple[dict[str, Any], Any]:
    """TRTR (whose model is also the Frechet feature space), TRTR matched, TSTR and the low-data regime."""
    cfg = settings.classifier()
    real = utility.LabelSet(a.train12, data.train.labels, data.train.superclasses)
    test = utility.LabelSet(a.test12, data.test.labels, data.test.superclasses)
    syn = utility.LabelSet(a.syn12, data.synthetic.labels, data.synthetic.superclasses)
    ref_model, trtr = utility.train_and_score(real.subset(a.classifier_records), test, cfg, cache, progress, "TRTR")
    trtr_matched = None
    if data.pairing == "ecg_id":  # the very records whose labels the synthetic set was conditioned on
        _, trtr_matched = utility.train_and_score(real.subset(np.sort(data.pairs)), test, cfg, cache, progress, "TRTR matched")
    _, tstr = utility.train_and_score(syn, test, cfg, cache, progress, "TSTR")
    sizes = tuple(n for n in settings.low_data_sizes if n <= len(real))
    low = utility.low_data_regime(real, syn, test, sizes, cfg, cache, settings.seed, progress)
    return {"trtr": trtr, "trtr_matched": trtr_matched, "tstr": tstr, "low_data": low}, ref_model


def _frechet(ref_model: Any, a: _Arrays, rng: np.random.Generator) -> dict[str, float | None]:
    feats_test = embed(ref_model, a.test12)
    if len(feats_test) < 2:
        return {"frechet_distance": None, "frechet_distance_real_reference": None}
    feats_ref = embed(ref_model, a.train12[_sample(len(a.train12), len(a.syn12), rng)])
    return {
        "frechet_distance": fidelity.frechet_distance(embed(ref_model, a.syn12), feats_test),
        "frechet_distance_real_reference": fidelity.frechet_distance(feats_ref, feats_test),
    }


def _clinical(data: EvalData, a: _Arrays, settings: Settings, cache: Path | None, rng: np.random.Generator,
              progress: bool) -> _Clinical:
    from common.data.leads import LEAD_NAMES
    from common.data.records import read_stored_leads

    clin_idx = _sample(len(a.train12), settings.max_clinical_records, rng)
    real_table, real_beats = clinical.features_table(a.train12[clin_idx], progress=progress)
    syn_table, syn_beats = clinical.features_table(a.syn12, progress=progress)
    # Lead-system consistency needs the leads as stored in the files (the loader keeps 8 and derives 4).
    stored_real = read_stored_leads(data.real_root, data.train.meta.iloc[clin_idx[:EINTHOVEN_RECORDS]], LEAD_NAMES)
    stored_syn = read_stored_leads(data.synthetic_root, data.synthetic.meta.iloc[:EINTHOVEN_RECORDS], LEAD_NAMES)
    idx = a.classifier_records
    age_model, sex_model = clinical.train_demographic_predictors(
        a.train12[idx], data.train.demographics[idx, 0], data.train.demographics[idx, 1], settings.classifier(),
        str(cache) if cache else None, progress)

    def demo_scores(x12: np.ndarray, ds: Any) -> dict[str, float | None]:
        return clinical.demographic_scores(age_model, sex_model, x12, ds.demographics[:, 0], ds.demographics[:, 1])

    metrics = {
        "features": clinical.feature_distances(real_table, syn_table),
        "beats": {"real": real_beats, "synthetic": syn_beats},
        "einthoven": {"real": clinical.einthoven_consistency(stored_real), "synthetic": clinical.einthoven_consistency(stored_syn)},
        "demographics": {"synthetic": demo_scores(a.syn12, data.synthetic), "real_test": demo_scores(a.test12, data.test)},
    }
    return _Clinical(metrics, (real_table, syn_table))


def _memorization(data: EvalData, settings: Settings, progress: bool) -> _Memorization:
    from common.normalization import Normalizer

    # The generator's own normalization when there is one; else one fitted on the real training records.
    normalizer = data.generator.normalizer if data.generator is not None else Normalizer.fit(data.train.signals)

    def features(x8: np.ndarray):
        return memorization.distance_features(normalizer.normalize(np.asarray(x8, dtype=np.float32)))

    distances: dict[str, np.ndarray] = {}
    mem: dict[str, Any] = memorization.distance_metrics(
        features(data.synthetic.signals), features(data.train.signals), features(data.test.signals),
        seed=settings.seed, distances=distances)
    mem["mia"], roc = None, None
    if data.generator is not None:
        mem["mia"], roc = _membership(data.generator, data.train, data.test, settings, progress)
    return _Memorization(mem, distances, roc)


def _plots(data: EvalData, a: _Arrays, util: dict[str, Any], clin: _Clinical, mem: _Memorization,
           plots_dir: Path) -> dict[str, Path]:
    from common.data.leads import LEAD_NAMES
    from common.plotting import plot_ecg_grid

    written: dict[str, Path] = {}
    written["interlead_correlation"] = plots.plot_correlation(
        fidelity.lead_correlation_matrices(a.train12).mean(0), fidelity.lead_correlation_matrices(a.syn12).mean(0),
        LEAD_NAMES, plots_dir / "interlead_correlation.png")
    freqs, p_real = fidelity.welch_psd(a.train12)
    _, p_syn = fidelity.welch_psd(a.syn12)
    written["psd"] = plots.plot_psd(freqs, p_real, p_syn, LEAD_NAMES, plots_dir / "psd.png")
    written["clinical_features"] = plots.plot_features(*clin.feature_tables, clinical.FEATURES, plots_dir / "clinical_features.png")
    d = mem.distances
    written["dcr"] = plots.plot_dcr(d["synthetic_to_train_subset"], d["synthetic_to_holdout"], d["holdout_to_train"],
                                    mem.metrics["near_copy_threshold"], plots_dir / "dcr.png")
    if mem.roc is not None:
        written["mia_roc"] = plots.plot_roc(*mem.roc, mem.metrics["mia"]["mia_auc"], plots_dir / "mia_roc.png")
    written["utility"] = plots.plot_utility(util, plots_dir / "utility.png")
    k = min(2, len(a.syn12))
    titles = [f"synthetic {int(data.synthetic.ecg_ids[i])}" for i in range(k)] + [
        f"real {int(data.train.ecg_ids[data.pairs[i]])} (its pair)" for i in range(k)]
    written["examples"] = plot_ecg_grid(np.concatenate([a.syn12[:k], a.paired_real12[:k]]), plots_dir / "examples.png",
                                        titles=titles, max_records=2 * k)
    return written


def _membership(gen: Any, train: Any, test: Any, settings: Settings, progress: bool) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """The loss attack over timesteps x noise draws; calibrated against the public base when there is one."""
    import torch

    rng = np.random.default_rng(settings.seed + 1)
    n = min(settings.mia_records, len(train), len(test))
    members = train.subset(np.sort(train.ecg_ids[rng.choice(len(train), n, replace=False)]))
    nonmembers = test.subset(np.sort(test.ecg_ids[rng.choice(len(test), n, replace=False)]))
    steps = memorization.default_timesteps(int(gen.cfg.diffusion.timesteps), settings.mia_timesteps)

    def tensors(ds: Any):
        x0 = torch.as_tensor(gen.normalizer.normalize(ds.signals.astype(np.float32)), dtype=torch.float32)
        return x0, torch.as_tensor(ds.labels), torch.as_tensor(ds.encoded_demographics())

    def losses(model: Any) -> tuple[np.ndarray, np.ndarray]:
        return tuple(memorization.diffusion_losses(model, gen.diffusion, *tensors(ds), timesteps=steps, seed=settings.seed,
                                                   noise_draws=settings.mia_noise_draws, progress=progress)
                     for ds in (members, nonmembers))

    loss_m, loss_n = losses(gen.model)  # scored on whatever device sampling left it
    out: dict[str, Any] = memorization.attack_metrics(-loss_m, -loss_n)
    out["mia_loss_members_mean"] = float(loss_m.mean())
    out["mia_loss_nonmembers_mean"] = float(loss_n.mean())
    out["mia_noise_draws"] = float(settings.mia_noise_draws)
    reference = _public_base_model(gen)
    out["calibrated"] = None
    if reference is not None:
        ref_m, ref_n = losses(reference)
        out["calibrated"] = memorization.attack_metrics(ref_m - loss_m, ref_n - loss_n)
    return out, memorization.roc_points(-loss_m, -loss_n)


def _public_base_model(gen: Any) -> Any:
    """The public base the generator was fine-tuned from, as a reference model (None: no base, or not here)."""
    from common.bundle import BundleError, initial_state
    from common.model.denoiser import build_denoiser

    if not gen.cfg.federation.init_from:
        return None
    try:
        state, _ = initial_state(gen.cfg)
    except (BundleError, FileNotFoundError, OSError) as err:
        logger.warning("membership attack: no calibration, the public base %s is not usable here: %s",
                    gen.cfg.federation.init_from, err)
        return None
    model = build_denoiser(gen.cfg.model)
    model.load_state_dict(state)
    return model.to(next(gen.model.parameters()).device)
