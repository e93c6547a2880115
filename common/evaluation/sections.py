"""The sections of the evaluation report, each computed from the arrays they share (`Arrays`).

`pipeline.run` builds the arrays once and calls these in order: fidelity, utility (whose TRTR model is also
the Frechet feature space), Frechet, clinical, memorization (with the loss attack when a generator is
given), and the plots of them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import clinical, fidelity, memorization, plots, utility
from .classifier import embed

if TYPE_CHECKING:
    from .pipeline import EvalData, Settings

logger = logging.getLogger(__name__)

EINTHOVEN_RECORDS = 200  # records per set read back from their files for the lead-system check


def sample_indices(n_total: int, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n, replace=False))


@dataclass
class Arrays:
    """The 12-lead arrays and record samples every section shares."""

    train12: np.ndarray
    test12: np.ndarray
    syn12: np.ndarray
    paired_real12: np.ndarray  # the real training record paired with each synthetic one
    real_reference: np.ndarray  # indices of held-out test records, as many as synthetic records
    classifier_records: np.ndarray  # indices of the training records the CNNs learn from


@dataclass
class ClinicalSection:
    metrics: dict[str, Any]
    feature_tables: tuple[np.ndarray, np.ndarray]  # per-record features (real, synthetic), for the plot


@dataclass
class MemorizationSection:
    metrics: dict[str, Any]
    distances: dict[str, np.ndarray]  # nearest-neighbour distances, for the DCR plot
    roc: tuple[np.ndarray, np.ndarray] | None  # (fpr, tpr) of the loss attack; None without a generator


def shared_arrays(data: EvalData, settings: Settings, rng: np.random.Generator) -> Arrays:
    """The 12-lead arrays of every set, the real reference sample (drawn from `rng`) and the CNNs' records."""
    train12 = data.train.signals12()
    return Arrays(
        train12=train12,
        test12=data.test.signals12(),
        syn12=data.synthetic.signals12(),
        paired_real12=train12[data.pairs],
        real_reference=sample_indices(len(data.test), len(data.synthetic), rng),
        # its own generator: the same real records (hence the same cached CNNs) whatever is evaluated
        classifier_records=sample_indices(len(data.train), settings.max_classifier_records,
                                          np.random.default_rng([settings.seed, 1])),
    )


def fidelity_metrics(data: EvalData, a: Arrays) -> dict[str, Any]:
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


def utility_metrics(data: EvalData, a: Arrays, settings: Settings, cache: Path | None, progress: bool) -> tuple[dict[str, Any], Any]:
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


def frechet_metrics(ref_model: Any, a: Arrays, rng: np.random.Generator) -> dict[str, float | None]:
    feats_test = embed(ref_model, a.test12)
    if len(feats_test) < 2:
        return {"frechet_distance": None, "frechet_distance_real_reference": None}
    feats_ref = embed(ref_model, a.train12[sample_indices(len(a.train12), len(a.syn12), rng)])
    return {
        "frechet_distance": fidelity.frechet_distance(embed(ref_model, a.syn12), feats_test),
        "frechet_distance_real_reference": fidelity.frechet_distance(feats_ref, feats_test),
    }


def clinical_metrics(data: EvalData, a: Arrays, settings: Settings, cache: Path | None, rng: np.random.Generator,
                     progress: bool) -> ClinicalSection:
    from common.data.leads import LEAD_NAMES
    from common.data.records import read_stored_leads

    clin_idx = sample_indices(len(a.train12), settings.max_clinical_records, rng)
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
    return ClinicalSection(metrics, (real_table, syn_table))


def memorization_metrics(data: EvalData, settings: Settings, progress: bool) -> MemorizationSection:
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
    return MemorizationSection(mem, distances, roc)


def write_plots(data: EvalData, a: Arrays, util: dict[str, Any], clin: ClinicalSection, mem: MemorizationSection,
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
