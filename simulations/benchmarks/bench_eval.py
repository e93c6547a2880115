"""Reference figures of the evaluation on real PTB-XL: TRTR macro AUROC and real-vs-real fidelity.

    python -m simulations.benchmarks.bench_eval [--root DIR] [--settings quick full] [--threads N]

DIR defaults to $PTBXL_DIR, else ../shared/ptb-xl next to the project. Prints:
- TRTR: the reference classifier (trained on the training folds, tested on evaluation.test_folds) with
  the --quick settings and the default (full) settings: macro AUROC on the 5 superclasses and on the
  statements present in the test fold, and the training time;
- real vs real: the training folds split by patient into two disjoint halves; the inter-lead correlation
  error, PSD distance and paired metrics between them (all records, and random samples of 200 and 500
  records of one half against the other, 5 draws each, to show the sampling noise at evaluation sizes);
- the time of each metric family on 500 records.
Classifiers are trained here without the cache, so timings are honest.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from common.config import DataConfig, EvaluationConfig
from common.data.dataset import load_dataset
from common.evaluation import clinical, fidelity, memorization, utility
from common.evaluation.pipeline import resolve_settings, split_folds
from common.normalization import Normalizer


def _root(arg: str | None) -> str:
    return arg or os.environ.get("PTBXL_DIR") or str(Path(__file__).resolve().parents[2] / ".." / "shared" / "ptb-xl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="PTB-XL folder (default: $PTBXL_DIR, else ../shared/ptb-xl)")
    parser.add_argument("--settings", nargs="+", default=["quick", "full"], choices=["quick", "full"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    data = load_dataset(DataConfig(root=_root(args.root)), progress=True)
    ev = EvaluationConfig()
    train, test = split_folds(data, ev.test_folds)
    print(f"records: {len(train)} training (folds != {list(ev.test_folds)}), {len(test)} test")
    train12, test12 = train.signals12(), test.signals12()
    _trtr(args.settings, ev, train, train12, utility.LabelSet(test12, test.labels, test.superclasses))
    in_b = _real_vs_real(train, train12)
    _metric_times(train, test, train12, in_b)


def _trtr(names: list[str], ev: EvaluationConfig, train, train12: np.ndarray, test_set) -> None:
    """The reference classifier under each named settings: macro AUROCs and training time."""
    print("\n== TRTR (reference classifier) ==")
    for name in names:
        settings = resolve_settings(ev, quick=(name == "quick"))
        rng = np.random.default_rng(settings.seed)
        idx = np.arange(len(train))
        if settings.max_classifier_records is not None and settings.max_classifier_records < len(train):
            idx = np.sort(rng.choice(len(train), settings.max_classifier_records, replace=False))
        cfg = settings.classifier()
        start = time.perf_counter()
        _, scores = utility.train_and_score(utility.LabelSet(train12[idx], train.labels[idx], train.superclasses[idx]),
                                            test_set, cfg, None, True, f"TRTR {name}")
        elapsed = time.perf_counter() - start
        print(f"{name:5s}: {len(idx)} records, {cfg.epochs} epochs (min {cfg.min_steps} steps): "
              f"superclasses {scores['macro_auroc_superclasses']:.4f}, statements {scores['macro_auroc_statements']:.4f} "
              f"({scores['statements_scored']} scored), {elapsed:.1f} s")


def _real_vs_real(train, train12: np.ndarray) -> np.ndarray:
    """Fidelity between two patient-disjoint halves A and B of the training folds; whether each record is in B."""
    print("\n== real vs real: two patient-disjoint halves of the training folds ==")
    rng = np.random.default_rng(0)
    patients = np.unique(train.patient_ids)
    half = set(rng.permutation(patients)[: len(patients) // 2].tolist())
    in_b = np.array([p in half for p in train.patient_ids])
    a12, b12 = train12[~in_b], train12[in_b]
    ilc = fidelity.interlead_correlation_error(a12, b12)
    print(f"all records ({len(a12)} vs {len(b12)}): inter-lead correlation error {ilc['mean']:.4f} "
          f"(max entry {ilc['max']:.4f}), PSD distance {fidelity.psd_distance(a12, b12).mean():.3f} dB")
    for n in (200, 500):
        values = []
        for _ in range(5):
            values.append(fidelity.interlead_correlation_error(a12, b12[rng.choice(len(b12), n, replace=False)])["mean"])
        print(f"{n} records of B vs all of A: inter-lead correlation error {np.mean(values):.4f} +- {np.std(values):.4f} "
              f"(5 draws)")
    pairs = fidelity.label_matched_pairs(train.labels[~in_b], train.labels[in_b][:500])
    paired = fidelity.paired_rmse_snr(a12[pairs], b12[:500])
    print(f"label-matched pairs (500): RMSE {paired['rmse_mv']:.4f} mV, SNR {paired['snr_db']:.2f} dB, "
          f"paired inter-lead correlation error {fidelity.paired_interlead_correlation_error(a12[pairs], b12[:500]):.4f}")
    return in_b


def _metric_times(train, test, train12: np.ndarray, in_b: np.ndarray) -> None:
    """The time of each metric family on 500 records of half B (against half A or all training records)."""
    print("\n== time per metric family, 500 synthetic-sized records ==")
    a12, x = train12[~in_b], train12[in_b][:500]
    norm = Normalizer.fit(train.signals)
    for label, fn in (
        ("quick_fidelity (100 vs 100)", lambda: fidelity.quick_fidelity(x[:100], a12[:100])),
        ("inter-lead correlation + PSD", lambda: (fidelity.interlead_correlation_error(a12, x), fidelity.psd_distance(a12, x))),
        ("delineation (lead II)", lambda: clinical.features_table(x)),
        ("DCR/NNDR vs all training records", lambda: memorization.distance_metrics(
            memorization.distance_features(norm.normalize(train.signals[in_b][:500])),
            memorization.distance_features(norm.normalize(train.signals[~in_b])),
            memorization.distance_features(norm.normalize(test.signals)))),
    ):
        start = time.perf_counter()
        fn()
        print(f"{label}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
