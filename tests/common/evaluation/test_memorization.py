"""Memorization metrics: planted copies are found, fresh records are not, the loss attack is at chance
on a model that never saw the members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.evaluation import memorization as mem
from tests.common.evaluation.eval_fixtures import ecg_like, make_eval_folders, one_torch_thread  # noqa: F401 (fixture)


def features(x: np.ndarray) -> torch.Tensor:
    return mem.distance_features(x / 0.5)  # a fixed scale stands in for the Normalizer


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(0)
    train, _ = ecg_like(rng, 60)
    holdout, _ = ecg_like(rng, 60)
    fresh, _ = ecg_like(rng, 20)
    return train, holdout, fresh


def test_distances_are_rms_of_standardized_records_and_zero_for_copies():
    a = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    b = torch.tensor([[1.0, 1.0, -1.0, -1.0], [2.0, -2.0, 2.0, -2.0]])  # orthogonal; a rescaled copy
    d = mem.nearest_distances(mem.distance_features(a[:, None, :], pool=1), mem.distance_features(b[:, None, :], pool=1), k=2)
    # unit-RMS records: d = sqrt(2 - 2r): copy (r=1) -> 0, orthogonal (r=0) -> sqrt(2)
    assert d[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert d[0, 1].item() == pytest.approx(np.sqrt(2.0), rel=1e-6)


def test_dcr_flags_planted_copies(sets):
    train, holdout, fresh = sets
    near_copy = train[3] + 0.002 * np.random.default_rng(1).standard_normal(train[3].shape).astype(np.float32)
    synthetic = np.concatenate([fresh, train[7:8], near_copy[None]])
    out = mem.distance_metrics(features(synthetic), features(train), features(holdout))
    dcr = mem.nearest_distances(features(synthetic), features(train), k=2)
    assert dcr[-2, 0].item() == pytest.approx(0.0, abs=1e-5)  # the exact copy
    assert dcr[-1, 0].item() < out["near_copy_threshold"]
    assert (dcr[:-2, 0] > out["near_copy_threshold"]).all()  # fresh records are not near copies
    assert out["near_copy_rate"] == pytest.approx(2 / 22)
    assert out["nndr_min"] < 0.01  # a copy's closest record is far closer than its second closest


def test_dcr_share_separates_copies_from_fresh_records(sets):
    train, holdout, fresh = sets
    fresh_out = mem.distance_metrics(features(fresh), features(train), features(holdout))
    copies_out = mem.distance_metrics(features(train[:20]), features(train), features(holdout))
    assert 0.2 <= fresh_out["dcr_share_closer_to_train"] <= 0.8
    assert fresh_out["near_copy_rate"] == 0.0
    assert copies_out["dcr_share_closer_to_train"] == 1.0
    assert copies_out["near_copy_rate"] == 1.0


def test_attack_metrics_by_hand():
    perfect = mem.attack_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert perfect["mia_auc"] == 1.0 and perfect["mia_tpr_at_1pct_fpr"] == 1.0
    # member scores 1, 3 vs non-member 2, 4: of the 4 (member, non-member) pairs only (3, 2) is ordered
    mixed = mem.attack_metrics(np.array([1.0, 3.0]), np.array([2.0, 4.0]))
    assert mixed["mia_auc"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="members and non-members"):
        mem.attack_metrics(np.array([]), np.array([1.0]))


def test_tpr_at_low_fpr_reads_the_roc_where_few_non_members_are_flagged():
    members = np.arange(100, 200, dtype=float)  # half the members outscore every non-member
    members[50:] -= 150
    nonmembers = np.arange(0, 1000, dtype=float) / 10  # 0 .. 99.9
    out = mem.attack_metrics(members, nonmembers)
    assert out["mia_tpr_at_0p1pct_fpr"] == pytest.approx(0.5, abs=0.02)  # 1 of 1000 non-members flagged
    assert out["mia_tpr_at_1pct_fpr"] == pytest.approx(0.5, abs=0.02)
    fpr, tpr = mem.roc_points(members, nonmembers)
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and np.all(np.diff(fpr) >= 0)


def test_more_noise_draws_average_out_the_noise(one_torch_thread):
    model, diffusion = tiny_model_and_diffusion()
    x, _ = ecg_like(np.random.default_rng(6), 8)
    x0 = torch.as_tensor(x[..., :256] / 0.5)  # 2.5 s of each record: the averaging does not need ten
    labels, demo = torch.zeros(8, 71), torch.zeros(8, 8)
    one = mem.diffusion_losses(model, diffusion, x0, labels, demo, [20], seed=0)
    assert np.array_equal(one, mem.diffusion_losses(model, diffusion, x0, labels, demo, [20], seed=0, noise_draws=1))
    # Each estimate is a mean over draws: its spread across seeds shrinks with the number of draws.
    def spread(draws):
        runs = [mem.diffusion_losses(model, diffusion, x0, labels, demo, [20], seed=s, noise_draws=draws) for s in range(6)]
        return np.std(runs, axis=0).mean()
    assert spread(8) < 0.6 * spread(1)
    with pytest.raises(ValueError, match="noise_draws"):
        mem.diffusion_losses(model, diffusion, x0, labels, demo, [20], noise_draws=0)


def test_default_timesteps_spread_over_the_schedule():
    assert mem.default_timesteps(200, 4) == [25, 75, 125, 175]
    assert all(0 <= t < 10 for t in mem.default_timesteps(10, 20))


def tiny_model_and_diffusion():
    from common.config import DiffusionConfig, ModelConfig
    from common.diffusion import GaussianDiffusion
    from common.model.denoiser import build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(size="tiny"))
    with torch.no_grad():  # the output layer starts at zero (eps = 0 for every input): give it weights
        for p in model.output_proj.parameters():
            p.normal_(0.0, 0.2)
    return model, GaussianDiffusion(DiffusionConfig(timesteps=100))


@pytest.mark.slow
def test_loss_attack_on_a_model_that_never_saw_the_members_is_at_chance(one_torch_thread):
    model, diffusion = tiny_model_and_diffusion()
    x, _ = ecg_like(np.random.default_rng(5), 160)
    x0 = torch.as_tensor(x / 0.5)
    labels = torch.zeros(160, 71)
    labels[:, 4] = 1.0
    demo = torch.zeros(160, 8)
    losses = mem.diffusion_losses(model, diffusion, x0, labels, demo, [20, 70])
    assert np.std(losses) > 0  # the scores differ from record to record: the AUC is not 0.5 by construction
    out = mem.attack_metrics(-losses[:80], -losses[80:])
    assert abs(out["mia_auc"] - 0.5) < 0.15
    assert out["mia_n_members"] == 80 and 0.0 <= out["mia_tpr_at_1pct_fpr"] <= 1.0
    # fixed timesteps and noises: the same records get the same scores in any call
    again = mem.diffusion_losses(model, diffusion, x0[:16], labels[:16], demo[:16], [20, 70])
    assert np.array_equal(losses[:16], again)


def test_site_memorization_metrics_returns_only_scalars(tmp_path, one_torch_thread):
    from common.config import DataConfig
    from common.data.dataset import load_dataset
    from common.normalization import Normalizer

    real_root, _ = make_eval_folders(tmp_path, n_real=36, n_synthetic=4)
    data = load_dataset(DataConfig(root=str(real_root), cache_dir=str(tmp_path / "cache")), progress=False)
    train = data.subset(data.ecg_ids[data.strat_fold != 9])
    holdout = data.subset(data.ecg_ids[data.strat_fold == 9])
    synthetic = np.concatenate([train.signals[:2], ecg_like(np.random.default_rng(9), 6)[0]])
    model, diffusion = tiny_model_and_diffusion()
    out = mem.site_memorization_metrics(model, diffusion, Normalizer.fit(train.signals), train, holdout, synthetic,
                                        max_records=4, mia_timesteps=2)
    assert all(type(v) is float for v in out.values())
    assert out["near_copy_rate"] == pytest.approx(2 / 8)
    assert out["mia_n_members"] == 4.0
    with pytest.raises(ValueError, match="synthetic8_mV must be"):
        mem.site_memorization_metrics(model, diffusion, Normalizer.fit(train.signals), train, holdout, synthetic[:, :3])
