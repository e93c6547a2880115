"""Gaussian diffusion: schedule math, posterior, DDPM/DDIM samplers, guidance, per-sample training losses,
and the tiny model overfitting one real ECG."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import DiffusionConfig, MidtConfig, ModelConfig
from common.diffusion import GaussianDiffusion
from common.losses import MelSpectrogramLoss
from common.model.denoiser import build_denoiser
from common.noise_schedule import beta_schedule

LEADS = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]




def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = build_denoiser(ModelConfig(size="tiny")).to(dtype)
    nn.init.normal_(model.output_proj.weight, std=0.1)  # undo the zero init so eps depends on the input
    return model


def _conditioning(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batch, 71, generator=g) < 0.1).float()
    demographics = torch.cat([torch.randn(batch, 4, generator=g), torch.ones(batch, 4)], dim=1)
    return labels, demographics


# -- schedule and forward process ---------------------------------------------------------------------------


def test_schedules() -> None:
    linear = beta_schedule("linear", 200, 1e-4, 0.02)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02) and len(linear) == 200
    cosine = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    abar = cosine.table("alphas_cumprod").numpy()
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 1e-3 and abar[0] > 0.99
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        GaussianDiffusion(DiffusionConfig(beta_start=0.1, beta_end=0.01))
    with pytest.raises(ValueError, match="unknown schedule"):
        beta_schedule("quadratic", 10)


def test_q_sample_has_the_marginal_mean_and_variance() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    abar = diffusion.table("alphas_cumprod")
    steps = torch.tensor([0, 50, 120, 199])
    x0 = torch.tensor([1.5, -0.7, 2.0, 0.3]).reshape(4, 1, 1).expand(4, 1, 40_000)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = diffusion.q_sample(x0, steps, noise)
    mean, var = x_t.mean(dim=(1, 2)), x_t.var(dim=(1, 2))
    for i, step in enumerate(steps):
        expected_mean = math.sqrt(abar[step]) * x0[i, 0, 0].item()
        assert mean[i].item() == pytest.approx(expected_mean, abs=0.02)
        assert var[i].item() == pytest.approx(1 - abar[step].item(), rel=0.03, abs=1e-5)


def test_predict_x0_inverts_q_sample() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    x0, noise = torch.randn(3, 8, 50, dtype=torch.float64), torch.randn(3, 8, 50, dtype=torch.float64)
    t = torch.tensor([0, 100, 199])
    torch.testing.assert_close(diffusion.predict_x0(diffusion.q_sample(x0, t, noise), t, noise), x0)


def test_posterior_matches_bayes_rule() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    betas = diffusion.table("betas")
    abar = diffusion.table("alphas_cumprod")
    x0, x_t = torch.randn(4, 1, 1, dtype=torch.float64), torch.randn(4, 1, 1, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 199])
    mean = diffusion.posterior_mean(x0, x_t, t)
    var = diffusion.posterior_variance(t, x_t)
    for i, step in enumerate(t.tolist()):
        # prior x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
        # likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)
        prior_var = 1 - abar[step - 1].item()
        beta = betas[step].item()
        alpha = 1 - beta
        precision = 1 / prior_var + alpha / beta
        prior_term = math.sqrt(abar[step - 1].item()) * x0[i].item() / prior_var
        expected_mean = (prior_term + math.sqrt(alpha) * x_t[i].item() / beta) / precision
        assert mean[i].item() == pytest.approx(expected_mean, rel=1e-9)
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-9)


def test_bad_timesteps_are_rejected() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 199\]"):
        diffusion.q_sample(torch.zeros(1, 8, 10), torch.tensor([200]), torch.zeros(1, 8, 10))


# -- samplers -----------------------------------------------------------------------------------------------


def test_ddim_with_eta_1_over_all_steps_is_the_ddpm_posterior() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    x_t, eps = torch.randn(2, 8, 30, dtype=torch.float64), torch.randn(2, 8, 30, dtype=torch.float64)
    for step in (1, 7, 100, 199):
        t = torch.full((2,), step)
        mean, variance = diffusion.ddim_step_moments(x_t, step, step - 1, eps, eta=1.0)
        torch.testing.assert_close(mean, diffusion.posterior_mean(diffusion.predict_x0(x_t, t, eps), x_t, t))
        assert variance == pytest.approx(diffusion.table("posterior_variance")[step].item(), rel=1e-12)
        assert diffusion.ddim_step_moments(x_t, step, step - 1, eps, eta=0.0)[1] == 0.0


def test_ddim_eta_1_trajectory_equals_ddpm_for_the_same_noise() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=20))
    model = _tiny(dtype=torch.float64)
    labels, demographics = _conditioning(2)
    labels, demographics = labels.double(), demographics.double()
    runs = {}
    for sampler, steps in (("ddpm", None), ("ddim", 20)):
        generator = torch.Generator().manual_seed(5)
        runs[sampler] = diffusion.sample(
            model, labels, demographics, steps=steps, sampler=sampler, eta=1.0, generator=generator, length=64
        )
    torch.testing.assert_close(runs["ddim"], runs["ddpm"], atol=1e-9, rtol=1e-9)


def test_ddim_timesteps_and_sampler_arguments() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    steps = diffusion.ddim_timesteps(50)
    assert len(steps) == 50 == len(set(steps)) and steps == sorted(steps, reverse=True)
    assert steps[0] == 199 and steps[-1] == 0
    assert diffusion.ddim_timesteps(200) == list(range(199, -1, -1))
    model = _tiny()
    labels, demographics = _conditioning(2)
    x = diffusion.sample(model, labels, demographics, steps=5, generator=torch.Generator().manual_seed(0), length=40)
    assert x.shape == (2, 8, 40) and torch.isfinite(x).all()
    assert model.training  # restored after sampling
    with pytest.raises(ValueError, match="DDPM runs all T=200 steps"):
        diffusion.sample(model, labels, demographics, steps=50, sampler="ddpm")
    with pytest.raises(ValueError, match="DDIM steps must lie in"):
        diffusion.sample(model, labels, demographics, steps=0)
    with pytest.raises(ValueError, match="eta must lie in"):
        diffusion.sample(model, labels, demographics, eta=1.5)


def test_sampling_from_a_noised_record_starts_at_that_step_and_an_exact_denoiser_returns_it() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=200))
    target = torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []

    class Oracle(nn.Module):  # the eps that makes x0_hat = target at every step
        in_channels = 8

        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))  # the sampler reads its dtype from a parameter

        def forward(self, x, t, labels, demographics, keep=None):
            calls.append(int(t[0]))
            abar = diffusion.table("alphas_cumprod")[t].view(-1, 1, 1)
            return ((x - abar.sqrt() * target) / (1 - abar).sqrt()).to(x.dtype)

    labels, demographics = _conditioning(2)
    out = diffusion.sample(Oracle(), labels, demographics, steps=50, eta=0.0, start=(target, 120),
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    plan = diffusion.ddim_timesteps(50)
    assert calls == [t for t in plan if t <= 120]  # from the plan's first step at or below 120, to 0
    with pytest.raises(ValueError, match="start step must lie in"):
        diffusion.sample(Oracle(), labels, demographics, start=(target, 200))
    with pytest.raises(ValueError, match="start records must be"):
        diffusion.sample(Oracle(), labels, demographics, start=(target[:1], 120))


def test_guidance() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = _tiny().eval()
    labels, demographics = _conditioning(3)
    x, t = torch.randn(3, 8, 60), torch.tensor([3, 90, 180])
    with torch.no_grad():
        conditional = model(x, t, labels, demographics)
        unconditional = model(x, t, labels, demographics, torch.zeros(3))
        torch.testing.assert_close(diffusion.model_eps(model, x, t, labels, demographics, 1.0), conditional)
        torch.testing.assert_close(
            diffusion.model_eps(model, x, t, labels, demographics, 3.0),
            unconditional + 3.0 * (conditional - unconditional),
            atol=1e-5,
            rtol=1e-5,
        )

    def draw(scale: float, lab: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return diffusion.sample(model, lab, demographics, steps=4, guidance_scale=scale, generator=generator, length=60)

    other = torch.roll(labels, 5, dims=1)
    assert (draw(1.0, labels) - draw(1.0, other)).abs().max() > 1e-3  # conditioning changes the sample
    torch.testing.assert_close(draw(0.0, labels), draw(0.0, other), atol=1e-5, rtol=1e-5)  # s = 0: unconditional


# -- training losses ----------------------------------------------------------------------------------------


def test_training_losses_are_per_example_and_match_a_direct_computation() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = _tiny(dtype=torch.float64)
    mel = MelSpectrogramLoss(MidtConfig()).double()
    x0 = torch.randn(3, 8, 100, dtype=torch.float64)
    labels, demographics = (v.double() for v in _conditioning(3))
    t, noise = torch.tensor([4, 60, 150]), torch.randn(3, 8, 100, dtype=torch.float64)
    keep = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    for target in ("posterior_mean", "x0"):
        draws = {"t": t, "noise": noise, "cond_keep": keep}
        out = diffusion.training_losses(
            model, x0, labels, demographics, mel_loss=mel, mel_weight=0.3, mel_target=target, **draws
        )
        assert {k: v.shape for k, v in out.items()} == {"loss": (3,), "eps": (3,), "mel": (3,)}
        x_t = diffusion.q_sample(x0, t, noise)
        eps_hat = model(x_t, t, labels, demographics, keep)
        torch.testing.assert_close(out["eps"], (eps_hat - noise).pow(2).mean(dim=(1, 2)))
        x0_hat = diffusion.predict_x0(x_t, t, eps_hat)
        if target == "x0":
            expected_mel = mel(x0_hat, x0)
        else:
            expected_mel = mel(diffusion.posterior_mean(x0_hat, x_t, t), diffusion.posterior_mean(x0, x_t, t))
        torch.testing.assert_close(out["mel"], expected_mel)
        torch.testing.assert_close(out["loss"], out["eps"] + 0.3 * out["mel"])
        # Example 1's loss does not depend on example 0's data.
        changed = x0.clone()
        changed[0] += 1.0
        again = diffusion.training_losses(
            model, changed, labels, demographics, mel_loss=mel, mel_weight=0.3, mel_target=target, **draws
        )
        torch.testing.assert_close(again["loss"][1:], out["loss"][1:])


def test_noise_multiplicity_averages_k_draws_per_example() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = _tiny(dtype=torch.float64)
    x0 = torch.randn(2, 8, 80, dtype=torch.float64)
    labels, demographics = (v.double() for v in _conditioning(2))
    t = torch.tensor([[3, 150], [77, 20]])
    noise = torch.randn(2, 2, 8, 80, dtype=torch.float64)
    out = diffusion.training_losses(model, x0, labels, demographics, noise_multiplicity=2, t=t, noise=noise)
    single = [
        diffusion.training_losses(model, x0, labels, demographics, t=t[:, k], noise=noise[:, k])["loss"]
        for k in range(2)
    ]
    torch.testing.assert_close(out["loss"], (single[0] + single[1]) / 2)
    generator = torch.Generator().manual_seed(0)
    random_draws = diffusion.training_losses(model, x0, labels, demographics, noise_multiplicity=3, generator=generator)
    assert random_draws["loss"].shape == (2,)


def test_cond_dropout_one_drops_all_conditioning() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = _tiny()
    x0 = torch.randn(2, 8, 64)
    labels, demographics = _conditioning(2)

    def loss(lab: torch.Tensor, dropout: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        out = diffusion.training_losses(model, x0, lab, demographics, cond_dropout=dropout, generator=generator)
        return out["loss"]

    other = torch.roll(labels, 7, dims=1)
    torch.testing.assert_close(loss(labels, 1.0), loss(other, 1.0))
    assert (loss(labels, 0.0) - loss(other, 0.0)).abs().max() > 0


def test_training_loss_arguments_are_checked() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = _tiny()
    x0 = torch.randn(2, 8, 64)
    labels, demographics = _conditioning(2)
    with pytest.raises(ValueError, match="needs a mel_loss"):
        diffusion.training_losses(model, x0, labels, demographics, mel_weight=0.1)
    with pytest.raises(ValueError, match="mel_target must be one of"):
        diffusion.training_losses(model, x0, labels, demographics, mel_target="x_t")
    with pytest.raises(ValueError, match="noise_multiplicity must be an integer >= 1"):
        diffusion.training_losses(model, x0, labels, demographics, noise_multiplicity=0)
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion.training_losses(model, x0, labels, demographics, t=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch size 2"):
        diffusion.training_losses(model, x0, labels[:1], demographics)


# -- learning -----------------------------------------------------------------------------------------------


def _one_real_ecg(root: Path) -> torch.Tensor:
    import wfdb

    record = sorted((root / "records100").glob("*/*_lr.hea"))[0]
    signal, fields = wfdb.rdsamp(str(record.with_suffix("")))
    leads = signal[:, [fields["sig_name"].index(name) for name in LEADS]].T  # (8, 1000)
    leads = (leads - leads.mean(axis=1, keepdims=True)) / leads.std(axis=1, keepdims=True)
    return torch.tensor(leads, dtype=torch.float32).unsqueeze(0)


@pytest.mark.slow
def test_tiny_model_overfits_one_real_ecg(shared_ptbxl: Path) -> None:
    x0 = _one_real_ecg(shared_ptbxl).expand(2, 8, 1000)
    diffusion = GaussianDiffusion(DiffusionConfig())
    mel = MelSpectrogramLoss(MidtConfig())
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(size="tiny"))
    labels, demographics = _conditioning(1)
    labels, demographics = labels.expand(2, 71), demographics.expand(2, 8)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 200, (2,), generator=g), torch.randn(2, 8, 1000, generator=g)  # fixed draws
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    start = time.perf_counter()
    for _ in range(100):
        out = diffusion.training_losses(
            model, x0, labels, demographics, mel_loss=mel, mel_weight=0.02, t=t, noise=noise
        )
        loss = out["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 10, (history[0], history[-1], f"{time.perf_counter() - start:.1f}s")


# -- v-prediction and min-SNR weighting ----------------------------------------------------------------------


def test_v_prediction_recovers_x0_and_eps_and_stays_bounded_where_eps_does_not() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="cosine", prediction="v"))
    x0, noise = torch.randn(4, 8, 50, dtype=torch.float64), torch.randn(4, 8, 50, dtype=torch.float64)
    t = torch.tensor([0, 60, 150, 199])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.split_output(x_t, t, diffusion.target(x0, t, noise))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    # The same output error of 0.1 at the last cosine step: x0 error 0.1 under v, thousands under eps.
    last = torch.tensor([199])
    error = torch.full((1, 8, 50), 0.1, dtype=torch.float64)
    v_x0, _ = diffusion.split_output(x_t[3:], last, diffusion.target(x0[3:], last, noise[3:]) + error)
    eps_x0 = diffusion.predict_x0(x_t[3:], last, noise[3:] + error)
    assert (v_x0 - x0[3:]).abs().max() < 0.11
    assert (eps_x0 - x0[3:]).abs().max() > 100


def test_v_loss_targets_v_and_min_snr_weights_it_as_capped_snr_on_x0() -> None:
    model = _tiny(dtype=torch.float64)
    x0 = torch.randn(3, 8, 100, dtype=torch.float64)
    labels, demographics = (v.double() for v in _conditioning(3))
    t, noise = torch.tensor([2, 80, 190]), torch.randn(3, 8, 100, dtype=torch.float64)
    for gamma in (0.0, 5.0):
        diffusion = GaussianDiffusion(DiffusionConfig(schedule="cosine", prediction="v", min_snr_gamma=gamma))
        out = diffusion.training_losses(model, x0, labels, demographics, t=t, noise=noise)
        x_t = diffusion.q_sample(x0, t, noise)
        output = model(x_t, t, labels, demographics, None)
        x0_error = (diffusion.split_output(x_t, t, output)[0] - x0).pow(2).mean(dim=(1, 2))
        abar = diffusion.table("alphas_cumprod")[t]
        snr = abar / (1 - abar)
        expected = x0_error * (snr + 1) if gamma == 0 else x0_error * snr.clamp(max=gamma)
        torch.testing.assert_close(out["eps"], expected.to(out["eps"].dtype), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(DiffusionConfig(prediction="x0"))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(DiffusionConfig(min_snr_gamma=-1.0))


def test_zero_terminal_snr_leaves_no_signal_at_the_last_step_and_samples_from_pure_noise() -> None:
    plain = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="v"))
    rescaled = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="v", zero_terminal_snr=True))
    abar, abar_plain = rescaled.table("alphas_cumprod").numpy(), plain.table("alphas_cumprod").numpy()
    assert abar[-1] == 0.0 and abar_plain[-1] > 1e-3  # 0.002 before: a QRS of 7 scales still stands at 0.3
    assert abar[0] == pytest.approx(abar_plain[0]) and np.all(np.diff(abar) < 0)
    betas = rescaled.table("betas").numpy()
    assert np.all((betas > 0) & (betas <= 1.0)) and betas[-1] == 1.0
    # x_T is the noise alone, whatever x0 was, and v-prediction recovers x0 there from a perfect output.
    x0, noise = 15 * torch.randn(2, 8, 40, dtype=torch.float64), torch.randn(2, 8, 40, dtype=torch.float64)
    last = torch.full((2,), rescaled.num_timesteps - 1)
    torch.testing.assert_close(rescaled.q_sample(x0, last, noise), noise)
    x0_hat, eps_hat = rescaled.split_output(noise, last, rescaled.target(x0, last, noise))
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    model = _tiny()
    labels, demographics = _conditioning(2)
    losses = rescaled.training_losses(model, x0.float(), labels, demographics, t=last, noise=noise.float())
    assert torch.isfinite(losses["loss"]).all()
    for sampler in ("ddim", "ddpm"):
        samples = rescaled.sample(model, labels, demographics, sampler=sampler, steps=None if sampler == "ddpm" else 10,
                                  eta=1.0, generator=torch.Generator().manual_seed(0), length=40)
        assert torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="zero_terminal_snr needs diffusion.prediction: v or blend"):
        GaussianDiffusion(DiffusionConfig(zero_terminal_snr=True))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_blend_is_eps_at_low_noise_v_at_high_noise_and_inverts_exactly(zero_terminal_snr: bool) -> None:
    cfg = DiffusionConfig(beta_end=0.06, prediction="blend", zero_terminal_snr=zero_terminal_snr)
    diffusion = GaussianDiffusion(cfg)
    v_diffusion = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="v", zero_terminal_snr=zero_terminal_snr))
    x0, noise = 7 * torch.randn(5, 8, 40, dtype=torch.float64), torch.randn(5, 8, 40, dtype=torch.float64)
    t = torch.tensor([0, 20, 100, 180, 199])
    target = diffusion.target(x0, t, noise)
    torch.testing.assert_close(target[0], noise[0], atol=2e-3, rtol=0)  # abar ~ 1: the target is eps
    if zero_terminal_snr:  # abar = 0: the target is v = -x0
        torch.testing.assert_close(target[4], v_diffusion.target(x0, t, noise)[4])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.split_output(x_t, t, target)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
    # min-SNR weighting in the output's units: the weighted output error equals min(SNR, gamma) |x0 error|^2.
    weighted = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="blend", min_snr_gamma=5.0))
    x_t = weighted.q_sample(x0, t, noise)
    error = 0.01 * torch.randn_like(x0)
    x0_error = (weighted.split_output(x_t, t, weighted.target(x0, t, noise) + error)[0] - x0).pow(2).mean(dim=(1, 2))
    abar = weighted.table("alphas_cumprod")[t]
    expected = (abar / (1 - abar)).clamp(max=5.0) * x0_error
    torch.testing.assert_close(error.pow(2).mean(dim=(1, 2)) * weighted.loss_weight(t).double(), expected, rtol=1e-4, atol=0)


def test_train_timesteps_restrict_the_training_draws_to_one_noise_range() -> None:
    diffusion = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="v", train_timesteps=(100, 200)))
    x0 = torch.randn(256, 8, 8)
    t, _, _ = diffusion._draw_missing(x0, None, None, None, 0.0, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 100 and int(t.max()) <= 199 and len(set(t.tolist())) > 50
    full, _, _ = GaussianDiffusion(DiffusionConfig())._draw_missing(x0, None, None, None, 0.0, torch.Generator().manual_seed(0))
    assert int(full.min()) < 100
    for bad in ((100,), (150, 100), (0, 201)):
        with pytest.raises(ValueError, match="train_timesteps"):
            GaussianDiffusion(DiffusionConfig(train_timesteps=bad))
