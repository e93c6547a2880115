"""The noise schedule of the diffusion: betas (linear or cosine) and the float64 tables derived from them."""

from __future__ import annotations

import math

import numpy as np


def beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas (float64 [T]): 'linear' from beta_start to beta_end, or 'cosine' (Nichol & Dhariwal 2021)."""
    if timesteps < 1:
        raise ValueError(f"diffusion.timesteps must be >= 1, got {timesteps}")
    if name == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"diffusion: the linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}"
            )
        return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008

        def alpha_bar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999) for i in range(timesteps)],
            dtype=np.float64,
        )
    raise ValueError(f"diffusion.schedule: unknown schedule {name!r} (known: linear, cosine)")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last step leaves no signal (abar_T = 0), the first step's unchanged: sqrt(abar) shifted and
    scaled linearly (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", alg. 1).

    Why it may matter for ECGs: a record's largest QRS peaks at about 7 public lead scales (median over PTB-XL
    records; 11 at the 90th percentile), so with abar_T = 0.002 it still stands at 0.3-0.5 noise units in x_T,
    in several leads at once. A denoiser can learn to put beats where x_T bulges, and sampling from pure noise
    then puts them where the noise happens to bulge. With abar_T = 0 the beats' places come from the model."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-step quantity the forward process, the posterior and the samplers look up (float64 [T])."""
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    # 1/abar is infinite at a zero-SNR last step: only the eps-to-x0 conversion reads it, and v-prediction,
    # which such a schedule requires, never converts eps there.
    with np.errstate(divide="ignore"):
        recip = 1.0 / alphas_cumprod
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(recip),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(recip - 1.0),
        "posterior_variance": posterior_variance,
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def blend_tables(abar: np.ndarray) -> dict[str, np.ndarray]:
    """Coefficients of the "blend" output alpha eps - beta x0 (float64 [T]) from abar: lambda = 1 - abar moves
    it from eps (lambda 0, no noise) to v (lambda 1, no signal); det = sqrt(abar) alpha + sqrt(1 - abar) beta
    > 0 is what recovers x0 and eps from it."""
    signal, noise = np.sqrt(abar), np.sqrt(1.0 - abar)
    weight = 1.0 - abar
    alpha, beta = 1.0 - weight + weight * signal, weight * noise
    return {"blend_alpha": alpha, "blend_beta": beta, "blend_det": signal * alpha + noise * beta}
