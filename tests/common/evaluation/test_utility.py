"""The shared CNN (determinism, content-keyed cache) and the utility experiments (TRTR on real data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.evaluation import utility
from common.evaluation.classifier import (
    ClassifierConfig,
    content_key,
    load_classifier,
    predict,
    train_classifier,
    train_or_load,
)
from tests.common.evaluation.eval_fixtures import ecg_like, one_torch_thread  # noqa: F401 (fixture)

SMALL = ClassifierConfig(widths=(8, 16), epochs=2, batch_size=16)


def small_set(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x, _ = ecg_like(np.random.default_rng(seed), n)
    y = (np.arange(n)[:, None] % np.array([2, 3]) == 0).astype(np.float32)
    return np.concatenate([x, x[:, :4]], axis=1), y  # 12 channels


def test_macro_auroc_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.4, 0.3, 0.5], [0.6, 0.7, 0.5]])
    # column 0: positives 0.9, 0.4 vs negatives 0.1, 0.6 -> 3 of 4 pairs ordered = 0.75; column 1: 1.0;
    # column 2 has no negatives and is left out
    value, scored = utility.macro_auroc(y, scores)
    assert scored == 2 and value == pytest.approx((0.75 + 1.0) / 2)
    assert utility.macro_auroc(np.ones((3, 1)), np.zeros((3, 1))) == (None, 0)


def test_training_is_deterministic_under_the_seed(one_torch_thread):
    x, y = small_set()
    a = train_classifier(x, y, "multilabel", SMALL, progress=False)
    b = train_classifier(x, y, "multilabel", SMALL, progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    c = train_classifier(x, y, "multilabel", ClassifierConfig(widths=(8, 16), epochs=2, batch_size=16, seed=1), progress=False)
    assert not torch.equal(a.head[1].weight, c.head[1].weight)


def test_min_steps_lengthens_training_of_small_sets(one_torch_thread):
    x, y = small_set(20)
    # 20 records, batches of 16: one full batch and a leftover of 4 -> 2 steps per epoch
    model = train_classifier(x, y, "multilabel", ClassifierConfig(widths=(8, 16), epochs=1, min_steps=6, batch_size=16), progress=False)
    opt_steps = [v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert int(opt_steps[0]) == 6


def test_cache_is_keyed_by_content_and_hyperparameters(tmp_path, one_torch_thread):
    x, y = small_set()
    model, loaded = train_or_load(x, y, "multilabel", SMALL, tmp_path, progress=False)
    assert not loaded
    again, loaded = train_or_load(x, y, "multilabel", SMALL, tmp_path, progress=False)
    assert loaded
    assert np.array_equal(predict(model, x), predict(again, x))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == content_key(x, y, "multilabel", SMALL)
    x2 = x.copy()
    x2[0, 0, 0] += 1e-3
    assert content_key(x2, y, "multilabel", SMALL) != content_key(x, y, "multilabel", SMALL)
    assert content_key(x, y, "multilabel", ClassifierConfig(widths=(8, 16), epochs=3, batch_size=16)) != files[0].stem
    reloaded, task = load_classifier(files[0])
    assert task == "multilabel" and np.array_equal(predict(reloaded, x), predict(model, x))


def test_regression_predicts_in_target_units(one_torch_thread):
    x, _ = small_set(48)
    target = np.linspace(20, 80, 48)[:, None].astype(np.float32)
    x = x[..., :250] * (target[:, :, None] / 50.0)  # amplitude carries the target; 2.5 s of signal show it
    model = train_classifier(x, target, "regression", ClassifierConfig(widths=(8, 16), epochs=40, batch_size=16, lr=1e-2), progress=False)
    pred = predict(model, x, "regression")[:, 0]
    assert np.abs(pred - target[:, 0]).mean() < 8.0  # predicting the mean would give 15


def test_bad_classifier_inputs_name_the_fault():
    x, y = small_set(4)
    with pytest.raises(ValueError, match="contain NaN"):
        train_classifier(x, np.full_like(y, np.nan), "multilabel", SMALL, progress=False)
    with pytest.raises(ValueError, match="must be 0/1"):
        train_classifier(x, y * 2, "binary", SMALL, progress=False)
    with pytest.raises(ValueError, match="task must be one of"):
        train_classifier(x, y, "ranking", SMALL, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[N, leads, T\]"):
        train_classifier(x[0], y, "multilabel", SMALL, progress=False)


def test_low_data_regime_uses_nested_real_subsets(one_torch_thread):
    x, y = small_set(40)
    labels = utility.LabelSet(x, np.repeat(y[:, :1], 71, axis=1), np.repeat(y[:, 1:], 5, axis=1))
    syn = labels.subset(np.arange(30, 40))
    rows = utility.low_data_regime(labels.subset(np.arange(30)), syn, labels.subset(np.arange(30, 40)), (10, 20), SMALL, progress=False)
    assert [r["n_real"] for r in rows] == [10, 20] and all(r["n_synthetic"] == 10 for r in rows)
    with pytest.raises(ValueError, match="exceeds the 30 real training records"):
        utility.low_data_regime(labels.subset(np.arange(30)), syn, syn, (31,), SMALL, progress=False)


@pytest.mark.slow
@pytest.mark.shared_data
def test_trtr_on_real_records_is_well_above_chance(shared_ptbxl, one_torch_thread):
    from common.config import DataConfig
    from common.data.dataset import load_dataset
    from common.data.metadata import read_metadata

    meta = read_metadata(shared_ptbxl)
    rng = np.random.default_rng(0)
    train_ids = np.sort(rng.choice(meta.index[meta["strat_fold"] != 9].to_numpy(), 800, replace=False))
    test_ids = np.sort(rng.choice(meta.index[meta["strat_fold"] == 9].to_numpy(), 300, replace=False))
    data = load_dataset(DataConfig(root=str(shared_ptbxl)), ecg_ids=np.concatenate([train_ids, test_ids]), progress=False)
    x12 = data.signals12()
    sets = utility.LabelSet(x12, data.labels, data.superclasses)
    is_test = np.isin(data.ecg_ids, test_ids)
    cfg = ClassifierConfig(epochs=2, min_steps=50, seed=0)
    _, scores = utility.train_and_score(sets.subset(np.flatnonzero(~is_test)), sets.subset(np.flatnonzero(is_test)), cfg, progress=False)
    assert scores["macro_auroc_superclasses"] > 0.75
    assert scores["macro_auroc_statements"] > 0.6
    assert scores["statements_scored"] >= 40
