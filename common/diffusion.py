"""Gaussian diffusion: q_sample, per-sample losses, DDPM/DDIM sampling (the schedule is noise_schedule.py).

A plain class (not an nn.Module), as in openai/improved-diffusion: the model is passed in, so a DP engine
can wrap the denoiser alone. The model is any callable

    model(x_t [B, C, L], t [B] int64, labels [B, 71], demographics [B, 8], cond_keep [B] or None) -> output

whose output is eps (diffusion.prediction = "eps") or v = sqrt(abar) eps - sqrt(1 - abar) x0 ("v",
Salimans & Ho 2022). v keeps x0_hat bounded at every t, which eps does not where abar is near 0 (the cosine
schedule's last steps): x0_hat error = sqrt(1/abar - 1) * eps error. "blend" outputs alpha eps - beta x0
with lambda = 1 - abar, alpha = 1 - lambda + lambda sqrt(abar), beta = lambda sqrt(1 - abar): eps where the
noise is small (where eps-trained models denoise best), v where it is large (bounded x0, and defined at a
zero-SNR last step). With min_snr_gamma > 0 each example's
denoising loss is weighted so that it equals min(SNR_t, gamma) * |x0_hat - x0|^2 (Hang et al. 2023), which
stops the many easy high-SNR steps from dominating the gradient.

Training (`training_losses`) returns per-example losses [B] (eps MSE + mel_weight * MIDT mel loss), because
DP-SGD clips per example and ghost clipping needs the [B] vector. With noise multiplicity K each example's
loss averages K (noise, timestep) draws (DPDM). The batch is repeated example-major inside
(rows i*K .. i*K+K-1 belong to example i). A DP engine that clips per row would bound each draw, not each
example; common/privacy/engine.py merges each example's K rows before clipping.

MIDT mel target (midt.target):
  * "posterior_mean" (default): mel loss between mu_theta = mean of q(x_{t-1} | x_t, x0_hat), the mean the
    reverse step actually uses, and mu = mean of q(x_{t-1} | x_t, x0) with the true x0. Both share the
    coef2 * x_t term and the error is scaled by coef1, which keeps the term bounded at large t, where
    x0_hat itself blows up (x0_hat error = sqrt(1/abar - 1) * eps error).
  * "x0": mel loss between x0_hat and x0 directly.

Sampling: ancestral DDPM over all T steps (posterior variance beta_tilde) or DDIM over an evenly spaced
subsequence with eta in [0, 1]; DDIM with eta=1 over all T steps is exactly DDPM. Classifier-free guidance:
eps = eps_u + s (eps_c - eps_u); s = 1 is the plain conditional model (no unconditional pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.config import DiffusionConfig
from common.diffusion_inputs import (
    check_training_inputs,
    override_rows,
    sample_channels,
)
from common.noise_schedule import beta_schedule, blend_tables, rescale_zero_terminal_snr, schedule_tables

__all__ = ["EpsModel", "GaussianDiffusion"]

SAMPLERS = ("ddim", "ddpm")
PREDICTIONS = ("eps", "v", "blend")


class EpsModel(Protocol):
    def __call__(
        self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None = None
    ) -> Tensor: ...


def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, **kw) -> Tensor:
    """Random draws on `device` from `generator`, wherever the generator lives."""
    source = device if generator is None else generator.device
    if kind == "randn":
        out = torch.randn(shape, generator=generator, device=source, dtype=kw.get("dtype"))
    elif kind == "rand":
        out = torch.rand(shape, generator=generator, device=source, dtype=kw.get("dtype"))
    else:
        out = torch.randint(kw["high"], shape, generator=generator, device=source)
    return out.to(device)


def _rhythm_kwargs(rhythm: Tensor | None) -> dict[str, Tensor]:
    """The keyword a rhythm-conditioned model takes; nothing for the others, whose signature lacks it."""
    return {} if rhythm is None else {"rhythm": rhythm}


@dataclass(frozen=True)
class _SamplingPlan:
    """A checked sampling request: the sampler, its timesteps (descending), eta and the guidance scale."""

    sampler: str
    timesteps: list[int]
    eta: float
    guidance_scale: float


class GaussianDiffusion:
    """The forward process q(x_t | x0) and the reverse-time samplers for an eps-prediction model."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {cfg.prediction!r}")
        if cfg.min_snr_gamma < 0:
            raise ValueError(f"diffusion.min_snr_gamma must be >= 0 (0 = unweighted), got {cfg.min_snr_gamma}")
        self.cfg = cfg
        betas = beta_schedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            if cfg.prediction == "eps":
                raise ValueError("diffusion.zero_terminal_snr needs diffusion.prediction: v or blend (eps says nothing "
                                 "of x0 where no signal is left)")
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = int(betas.shape[0])
        if cfg.expert:
            if cfg.prediction != "eps":
                raise ValueError(f"diffusion.expert answers the high-noise steps of an eps model; this one predicts "
                                 f"{cfg.prediction!r} (set diffusion.expert: null to train or sample it alone)")
            if not 0 < cfg.expert_from < self.num_timesteps:
                raise ValueError(f"diffusion.expert_from must lie in 1..{self.num_timesteps - 1}, got {cfg.expert_from}")
        self.train_range = self._train_range(cfg.train_timesteps)
        self._tables = {name: torch.from_numpy(values) for name, values in schedule_tables(betas).items()}  # float64 [T]
        blend = blend_tables(self._tables["alphas_cumprod"].numpy())
        self._tables.update({name: torch.from_numpy(values) for name, values in blend.items()})
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def _train_range(self, steps: tuple[int, ...] | None) -> tuple[int, int]:
        if steps is None:
            return 0, self.num_timesteps
        if len(steps) != 2 or not 0 <= steps[0] < steps[1] <= self.num_timesteps:
            raise ValueError(f"diffusion.train_timesteps must be [first, last) with 0 <= first < last <= "
                             f"{self.num_timesteps}, got {list(steps)}")
        return int(steps[0]), int(steps[1])

    # -- schedule lookups --------------------------------------------------------------------------------

    def table(self, name: str) -> Tensor:
        """A float64 [T] schedule table (e.g. 'alphas_cumprod', 'posterior_variance')."""
        return self._tables[name]

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """table[t] as [B, 1, 1] in like's dtype and device."""
        key = (name, t.device)
        if key not in self._on_device:
            self._on_device[key] = self._tables[name].to(t.device)
        values = self._on_device[key][t]  # (B)
        return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: Tensor, batch: int) -> None:
        if t.shape != (batch,):
            raise ValueError(f"diffusion: t must be [B]=[{batch}], got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError(f"diffusion: t must hold integer steps, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"diffusion: t must lie in [0, {self.num_timesteps - 1}], got [{int(t.min())}, {int(t.max())}]"
            )

    # -- forward process and posterior -------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        self._check_t(t, x0.shape[0])
        if noise.shape != x0.shape:
            raise ValueError(f"q_sample: noise {tuple(noise.shape)} must match x0 {tuple(x0.shape)}")
        signal = self._extract("sqrt_alphas_cumprod", t, x0)
        return signal * x0 + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        scale = self._extract("sqrt_recip_alphas_cumprod", t, x_t)
        return scale * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the denoiser is trained to output: noise itself, v, or the blend's alpha eps - beta x0."""
        if self.cfg.prediction == "v":
            return self._extract("sqrt_alphas_cumprod", t, x0) * noise - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        if self.cfg.prediction == "blend":
            return self._extract("blend_alpha", t, x0) * noise - self._extract("blend_beta", t, x0) * x0
        return noise

    def split_output(self, x_t: Tensor, t: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the denoiser's output at x_t."""
        signal = self._extract("sqrt_alphas_cumprod", t, x_t)
        noise_level = self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.cfg.prediction == "v":
            return signal * x_t - noise_level * output, noise_level * x_t + signal * output
        if self.cfg.prediction == "blend":
            # Invert [x_t; o] = [[a, s], [-beta, alpha]] [x0; eps], determinant a alpha + s beta > 0.
            alpha, beta = self._extract("blend_alpha", t, x_t), self._extract("blend_beta", t, x_t)
            det = self._extract("blend_det", t, x_t)
            return (alpha * x_t - noise_level * output) / det, (beta * x_t + signal * output) / det
        return self.predict_x0(x_t, t, output), output

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-row weight [B] of the denoising MSE: 1, or the min-SNR-gamma weight in the output's units."""
        gamma = self.cfg.min_snr_gamma
        if gamma <= 0:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        abar = self._tables["alphas_cumprod"].to(t.device)[t]
        snr = (abar / (1.0 - abar)).to(torch.float32)
        # |x0 error|^2 = |eps error|^2 / SNR = |v error|^2 / (SNR + 1) = |blend error|^2 (1 - abar) / det^2
        if self.cfg.prediction == "blend":
            det = self._tables["blend_det"].to(t.device)[t]
            return (torch.clamp(snr, max=gamma) * ((1.0 - abar) / det**2).to(torch.float32))
        return torch.clamp(snr, max=gamma) / (snr + 1.0 if self.cfg.prediction == "v" else snr)

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0)."""
        return self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t

    def posterior_variance(self, t: Tensor, like: Tensor) -> Tensor:
        """Variance of q(x_{t-1} | x_t, x0) (beta_tilde_t), as [B, 1, 1]."""
        return self._extract("posterior_variance", t, like)

    # -- training ----------------------------------------------------------------------------------------

    def training_losses(
        self,
        model: EpsModel,
        x0: Tensor,
        labels: Tensor,
        demographics: Tensor,
        mel_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        mel_weight: float = 0.0,
        mel_target: str = "posterior_mean",
        cond_dropout: float = 0.0,
        noise_multiplicity: int = 1,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        cond_keep: Tensor | None = None,
        rhythm: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses {loss, eps, mel}, each [B]; loss = eps + mel_weight * mel.

        `rhythm` [B, 1, L]: the examples' beat maps, for a rhythm-conditioned model (common/rhythm.py).

        "eps" is the (weighted) denoising MSE of the model's output against its target (eps, v or blend).

        t ([B, K] or [B] when K = 1), noise ([B, K, C, L] or [B, C, L]) and cond_keep (same layout as t)
        override the random draws, for tests and exact replays. Timesteps are uniform on [0, T), or on
        diffusion.train_timesteps.
        """
        check_training_inputs(x0, labels, demographics, mel_loss, mel_weight, mel_target, cond_dropout, noise_multiplicity)
        batch, k = x0.shape[0], noise_multiplicity
        t, noise, cond_keep = (override_rows(value, name, batch, k, per_row, x0.device) for value, name, per_row in
                               ((t, "t", ()), (noise, "noise", tuple(x0.shape[1:])), (cond_keep, "cond_keep", ())))
        if rhythm is not None and rhythm.shape != (batch, 1, x0.shape[-1]):
            raise ValueError(f"training_losses: rhythm must be [B, 1, L]=[{batch}, 1, {x0.shape[-1]}], "
                             f"got {tuple(rhythm.shape)}")
        if k > 1:  # example-major: rows i*K .. i*K+K-1 are example i
            x0, labels, demographics = (v.repeat_interleave(k, dim=0) for v in (x0, labels, demographics))
            rhythm = None if rhythm is None else rhythm.repeat_interleave(k, dim=0)
        t, noise, cond_keep = self._draw_missing(x0, t, noise, cond_keep, cond_dropout, generator)

        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t, labels, demographics, cond_keep, **_rhythm_kwargs(rhythm))
        if output.shape != x0.shape:
            raise ValueError(f"training_losses: the model returned {tuple(output.shape)}, expected {tuple(x0.shape)}")
        # (B*K); promotes a bf16 output to the target's float32
        eps_term = (output - self.target(x0, t, noise)).pow(2).mean(dim=(1, 2)) * self.loss_weight(t)
        if mel_loss is not None:
            mel_term = self._mel_term(mel_loss, mel_weight, mel_target, x0, x_t, t, output).to(eps_term.dtype)
        else:
            mel_term = torch.zeros_like(eps_term)
        loss = eps_term + mel_weight * mel_term if mel_weight > 0 else eps_term

        def per_example(value: Tensor) -> Tensor:
            return value.reshape(batch, k).mean(dim=1)  # (B)

        return {"loss": per_example(loss), "eps": per_example(eps_term), "mel": per_example(mel_term)}

    def _draw_missing(self, x0: Tensor, t: Tensor | None, noise: Tensor | None, cond_keep: Tensor | None,
                      cond_dropout: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Timesteps, noise and condition-keep flags for every row not given by the caller (in this order)."""
        rows, device = x0.shape[0], x0.device
        if t is None:
            first, last = self.train_range
            t = first + _draw("randint", (rows,), generator, device, high=last - first)
        if noise is None:
            noise = _draw("randn", tuple(x0.shape), generator, device, dtype=x0.dtype)
        if cond_keep is None and cond_dropout > 0:
            cond_keep = (_draw("rand", (rows,), generator, device) >= cond_dropout).to(x0.dtype)
        return t, noise, cond_keep

    def _mel_term(self, mel_loss: Callable[[Tensor, Tensor], Tensor], mel_weight: float, mel_target: str,
                  x0: Tensor, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """MIDT's mel loss of the model's x0 estimate (or of the posterior mean it implies), [B*K]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and mel_weight > 0):  # weight 0: monitored only
            x0_hat, _ = self.split_output(x_t, t, output)
            if mel_target == "posterior_mean":
                return mel_loss(self.posterior_mean(x0_hat, x_t, t), self.posterior_mean(x0, x_t, t))
            return mel_loss(x0_hat, x0)

    # -- sampling ----------------------------------------------------------------------------------------

    def model_eps(
        self,
        model: EpsModel,
        x: Tensor,
        t: Tensor,
        labels: Tensor,
        demographics: Tensor,
        guidance_scale: float = 1.0,
        rhythm: Tensor | None = None,
    ) -> Tensor:
        """The guided output u + s (c - u) (eps or v); one conditional pass when s = 1, else one doubled batch.
        The beat map `rhythm`, where given, is kept in both halves: guidance amplifies labels and demographics."""
        if guidance_scale == 1.0:
            return model(x, t, labels, demographics, None, **_rhythm_kwargs(rhythm))
        batch = x.shape[0]
        keep = torch.cat([torch.ones(batch, device=x.device), torch.zeros(batch, device=x.device)]).to(x.dtype)
        doubled = [torch.cat([v, v]) for v in (x, t, labels, demographics)]
        eps = model(*doubled, keep, **_rhythm_kwargs(None if rhythm is None else torch.cat([rhythm, rhythm])))
        eps_cond, eps_uncond = eps[:batch], eps[batch:]
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` distinct timesteps, evenly spaced over [0, T-1], descending (T-1 first, 0 last)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"sample: DDIM steps must lie in [1, {self.num_timesteps}], got {steps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        grid = np.round(np.linspace(0, self.num_timesteps - 1, steps)).astype(np.int64)
        return [int(v) for v in grid[::-1]]

    @torch.no_grad()
    def sample(
        self,
        model: EpsModel,
        labels: Tensor,
        demographics: Tensor,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        length: int = 1000,
        channels: int | None = None,
        start: tuple[Tensor, int] | None = None,
        rhythm: Tensor | None = None,
    ) -> Tensor:
        """Draw x0 [B, C, length] for the conditioning rows (labels [B, 71], demographics [B, 8]).

        sampler 'ddpm' runs all T ancestral steps; 'ddim' runs `steps` (default diffusion.sample_steps)
        with stochasticity eta. Unset arguments come from the diffusion config. C defaults to
        model.in_channels. `start=(x0, step)` begins from x0 [B, C, L] diffused to the plan's first timestep
        at or below `step` (SDEdit: what the sampler keeps of a record from that noise level) instead of
        from pure noise at T-1. `rhythm` [B, 1, length]: the beat maps a rhythm-conditioned model follows.
        """
        plan = self._plan(steps, sampler, eta, guidance_scale)
        first = 0
        if start is not None:
            x_start, start_step = start
            if x_start.dim() != 3 or x_start.shape[0] != labels.shape[0]:
                raise ValueError(f"sample: start records must be [B, C, L] with B = {labels.shape[0]} conditioning "
                                 f"rows, got {tuple(x_start.shape)}")
            if not 0 <= start_step < self.num_timesteps:
                raise ValueError(f"sample: start step must lie in [0, {self.num_timesteps - 1}], got {start_step}")
            first = next(i for i, step in enumerate(plan.timesteps) if step <= start_step)
            length, channels = x_start.shape[-1], x_start.shape[-2]
        channels = sample_channels(model, labels, demographics, length, channels)
        if rhythm is not None and rhythm.shape != (labels.shape[0], 1, length):
            raise ValueError(f"sample: rhythm must be [B, 1, L]=[{labels.shape[0]}, 1, {length}], got {tuple(rhythm.shape)}")
        dtype = next(iter(model.parameters())).dtype if isinstance(model, nn.Module) else torch.float32
        was_training = isinstance(model, nn.Module) and model.training
        if isinstance(model, nn.Module):
            model.eval()
        try:
            x = _draw("randn", (labels.shape[0], channels, length), generator, labels.device, dtype=dtype)
            if start is not None:
                t = torch.full((labels.shape[0],), plan.timesteps[first], device=labels.device, dtype=torch.long)
                x = self.q_sample(start[0].to(device=labels.device, dtype=dtype), t, x)
            for i in tqdm(range(first, len(plan.timesteps)), desc=f"{plan.sampler} sampling", disable=not progress,
                          leave=False):
                x = self._reverse_step(model, x, plan, i, labels, demographics, generator, rhythm)
        finally:
            if was_training:
                model.train()
        return x

    def _plan(self, steps: int | None, sampler: str | None, eta: float | None,
              guidance_scale: float | None) -> _SamplingPlan:
        """The sampling request with the config's defaults filled in, checked, and its descending timesteps."""
        sampler = self.cfg.sampler if sampler is None else sampler
        eta = self.cfg.eta if eta is None else float(eta)
        guidance_scale = self.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        if sampler not in SAMPLERS:
            raise ValueError(f"sample: sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"sample: eta must lie in [0, 1], got {eta}")
        if guidance_scale < 0:
            raise ValueError(f"sample: guidance_scale must be >= 0, got {guidance_scale}")
        if sampler == "ddpm":
            if steps is not None and steps != self.num_timesteps:
                raise ValueError(
                    f"sample: DDPM runs all T={self.num_timesteps} steps, got steps={steps}; use sampler='ddim'"
                )
            timesteps = list(range(self.num_timesteps - 1, -1, -1))
        else:
            timesteps = self.ddim_timesteps(self.cfg.sample_steps if steps is None else steps)
        return _SamplingPlan(sampler, timesteps, eta, guidance_scale)

    def _reverse_step(self, model: EpsModel, x: Tensor, plan: _SamplingPlan, i: int, labels: Tensor,
                      demographics: Tensor, generator: torch.Generator | None, rhythm: Tensor | None) -> Tensor:
        """x at the plan's i-th timestep to the next one (to x0 after the last)."""
        step = plan.timesteps[i]
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        output = self.model_eps(model, x, t, labels, demographics, plan.guidance_scale, rhythm)
        x0_hat, eps = self.split_output(x, t, output)
        if plan.sampler == "ddpm":
            x = self.posterior_mean(x0_hat, x, t)
            if step > 0:
                z = _draw("randn", tuple(x.shape), generator, x.device, dtype=x.dtype)
                x = x + self.posterior_variance(t, x).sqrt() * z
            return x
        prev = plan.timesteps[i + 1] if i + 1 < len(plan.timesteps) else -1
        return self._ddim_step(x0_hat, eps, step, prev, plan.eta, generator)

    def _ddim_moments(self, x0_hat: Tensor, eps: Tensor, step: int, prev: int, eta: float) -> tuple[Tensor, float]:
        """Mean and standard deviation of x_prev given x_t (Song et al. 2021, eq. 12); prev = -1 is the final x0."""
        abar = float(self._tables["alphas_cumprod"][step])
        abar_prev = 1.0 if prev < 0 else float(self._tables["alphas_cumprod"][prev])
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        mean = math.sqrt(abar_prev) * x0_hat + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        return mean, sigma

    def _ddim_step(
        self, x0_hat: Tensor, eps: Tensor, step: int, prev: int, eta: float, generator: torch.Generator | None
    ) -> Tensor:
        x, sigma = self._ddim_moments(x0_hat, eps, step, prev, eta)
        if sigma > 0:
            x = x + sigma * _draw("randn", tuple(x.shape), generator, x.device, dtype=x.dtype)
        return x

    def ddim_step_moments(self, x_t: Tensor, step: int, prev: int, eps: Tensor, eta: float) -> tuple[Tensor, float]:
        """Mean and variance of one DDIM step from x_t at `step` to `prev`, given the model's eps."""
        t = torch.full((x_t.shape[0],), step, device=x_t.device, dtype=torch.long)
        mean, sigma = self._ddim_moments(self.predict_x0(x_t, t, eps), eps, step, prev, eta)
        return mean, sigma**2
