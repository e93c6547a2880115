"""Downstream utility: does a classifier trained on synthetic ECGs work on real ones?

One multilabel ResNet1d (classifier.py) predicts the 71 SCP statements and the 5 superclasses at once
(76 outputs, BCE). Scores on the real test fold:
- `macro_auroc_superclasses`: mean AUROC over the 5 superclasses;
- `macro_auroc_statements`: mean AUROC over those of the 71 statements that have both positive and
  negative records in the test set (a label absent from the test set has no AUROC; the count used is
  reported as `statements_scored`).

Experiments:
- TRTR: real training records -> real test (the reference classifier; also the Frechet feature space).
- TRTR (matched): the real records whose labels the synthetic set was conditioned on -> real test: the
  real counterpart of equal size to TSTR.
- TSTR: synthetic records -> real test.
- Low-data regime: for each size n, a random real subset of n training records alone, and the same subset
  plus all synthetic records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from .classifier import ClassifierConfig, predict, train_or_load


@dataclass(frozen=True)
class LabelSet:
    """Signals [N, 12, T] (mV), statements [N, 71] and superclasses [N, 5] of one set of records."""

    signals12: np.ndarray
    statements: np.ndarray
    superclasses: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.signals12)
        if np.asarray(self.signals12).ndim != 3:
            raise ValueError(f"signals12 must be [N, 12, T], got shape {np.asarray(self.signals12).shape}")
        if len(self.statements) != n or len(self.superclasses) != n:
            raise ValueError(
                f"signals, statements and superclasses differ in length: {n}, {len(self.statements)}, {len(self.superclasses)}"
            )

    def targets(self) -> np.ndarray:
        return np.concatenate([self.statements, self.superclasses], axis=1).astype(np.float32)

    def subset(self, idx: np.ndarray) -> LabelSet:
        return LabelSet(self.signals12[idx], self.statements[idx], self.superclasses[idx])

    def __len__(self) -> int:
        return len(self.signals12)


def concat(a: LabelSet, b: LabelSet) -> LabelSet:
    return LabelSet(
        np.concatenate([a.signals12, b.signals12]),
        np.concatenate([a.statements, b.statements]),
        np.concatenate([a.superclasses, b.superclasses]),
    )


def macro_auroc(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float | None, int]:
    """Mean AUROC over columns with both classes present; (None, 0) when no column qualifies."""
    y_true = np.asarray(y_true) > 0.5
    scores = []
    for k in range(y_true.shape[1]):
        col = y_true[:, k]
        if col.any() and not col.all():
            scores.append(roc_auc_score(col, y_score[:, k]))
    return (float(np.mean(scores)) if scores else None), len(scores)


def score(model, test: LabelSet) -> dict[str, float | int | None]:
    probs = predict(model, test.signals12, "multilabel")
    n_statements = test.statements.shape[1]
    statements, n_scored = macro_auroc(test.statements, probs[:, :n_statements])
    supers, _ = macro_auroc(test.superclasses, probs[:, n_statements:])
    return {"macro_auroc_superclasses": supers, "macro_auroc_statements": statements, "statements_scored": n_scored}


def train_and_score(
    train: LabelSet,
    test: LabelSet,
    cfg: ClassifierConfig,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "classifier",
):
    """Train (or load from the content-keyed cache) the multilabel classifier; returns (model, scores)."""
    model, _ = train_or_load(train.signals12, train.targets(), "multilabel", cfg, cache_dir, progress, desc)
    result = score(model, test)
    result["n_train"] = len(train)
    return model, result


def low_data_regime(
    real_train: LabelSet,
    synthetic: LabelSet,
    test: LabelSet,
    sizes: tuple[int, ...],
    cfg: ClassifierConfig,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float | int | None]]:
    """For each n in sizes (n <= len(real_train)): real subset alone vs real subset + all synthetic."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real_train))
    rows = []
    for n in sizes:
        if n > len(real_train):
            raise ValueError(f"low-data size {n} exceeds the {len(real_train)} real training records")
        sub = real_train.subset(np.sort(order[:n]))  # nested subsets: 100 within 500 within 1000
        _, real_only = train_and_score(sub, test, cfg, cache_dir, progress, f"real {n}")
        _, mixed = train_and_score(concat(sub, synthetic), test, cfg, cache_dir, progress, f"real {n} + synthetic")
        rows.append({
            "n_real": n,
            "n_synthetic": len(synthetic),
            "real_macro_auroc_superclasses": real_only["macro_auroc_superclasses"],
            "real_macro_auroc_statements": real_only["macro_auroc_statements"],
            "mixed_macro_auroc_superclasses": mixed["macro_auroc_superclasses"],
            "mixed_macro_auroc_statements": mixed["macro_auroc_statements"],
        })
    return rows
