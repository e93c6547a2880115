"""Denoising error per timestep: each parameterisation's implied eps and x0 are scored against the truth."""

from types import SimpleNamespace

import pytest
import torch

from common.config import DiffusionConfig
from common.diffusion import GaussianDiffusion
from common.train import TrainingData
from simulations.benchmarks.bench_denoise_by_t import denoising_errors, main


class ZeroOutput(torch.nn.Module):
    def forward(self, x, t, labels, demographics, cond_keep=None):
        return torch.zeros_like(x)


def _data(records: int = 16) -> TrainingData:
    g = torch.Generator().manual_seed(1)
    return TrainingData(3 * torch.randn(records, 8, 200, generator=g), torch.zeros(records, 71), torch.zeros(records, 8))


def test_errors_follow_from_the_parameterisation():
    data = _data()
    steps = [0, 100, 199]
    eps_model = SimpleNamespace(model=ZeroOutput(), diffusion=GaussianDiffusion(DiffusionConfig(beta_end=0.06)))
    rows = denoising_errors(eps_model, data, steps)
    assert [r[0] for r in rows] == steps
    # eps_hat = 0: the eps error is the noise's own variance at every step, and x0_hat = x_t / sqrt(abar)
    # carries that noise amplified by sqrt(1/abar - 1), which grows with t.
    assert all(r[1] == pytest.approx(1.0, abs=0.05) for r in rows)
    assert rows[0][2] < rows[1][2] < rows[2][2]
    v_model = SimpleNamespace(model=ZeroOutput(), diffusion=GaussianDiffusion(
        DiffusionConfig(beta_end=0.06, prediction="v", zero_terminal_snr=True)))
    last = denoising_errors(v_model, data, [199])[0]
    # v = 0 at abar = 0: x0_hat = sqrt(abar) x_t = 0, so the x0 error is the signal's power (9 here).
    assert last[2] == pytest.approx(float(data.signals.pow(2).mean()), rel=1e-6)


def test_too_few_records_is_a_clear_error(tiny_ptbxl, tmp_path):
    from tests.run_configs import tiny_run_config

    config = tiny_run_config(tiny_ptbxl.root, tmp_path, partition={"scheme": "site", "num_sites": 2, "val_folds": [9]})
    with pytest.raises(ValueError, match="--records 500"):
        main([str(tmp_path), "--data", str(tiny_ptbxl.root), "--config", str(config), "--records", "500"])
