"""One sampler, two denoisers: the high-noise steps from one checkpoint, the low-noise steps from another.

    python -m simulations.benchmarks.bench_hybrid_sampler --low models/ptbxl-site0-unet \\
        --high RUN/checkpoints/final --switch 100 --records 64 --out DIR

`bench_denoise_by_t` shows an eps model denoising best where the noise is small and a model trained for x0 at
high noise (v-prediction, zero terminal SNR) placing the record's layout best where it is large. This
samples with the low checkpoint's schedule and sampler; at its timesteps >= --switch the high checkpoint
answers instead (at its own timestep of the nearest abar, its x0 estimate turned into the low model's eps).
The samples, conditioned like held-out validation records, are scored as `bench_quality_curve` scores a
snapshot, next to the low and the high checkpoint alone, and drawn as one ECG grid per sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn


class SwitchedDenoiser(nn.Module):
    """An eps model for `low_diffusion`'s schedule: `low` below `switch`, `high` (any parameterisation, its
    own schedule) at and above it."""

    def __init__(self, low: nn.Module, low_diffusion, high: nn.Module, high_diffusion, switch: int) -> None:
        super().__init__()
        self.low, self.high, self.switch = low, high, switch
        self.low_diffusion, self.high_diffusion = low_diffusion, high_diffusion
        abar_low, abar_high = low_diffusion.table("alphas_cumprod"), high_diffusion.table("alphas_cumprod")
        self.register_buffer("high_step", (abar_low[:, None] - abar_high[None, :]).abs().argmin(dim=1), persistent=False)
        self.in_channels = low.in_channels

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, cond_keep: Tensor | None = None) -> Tensor:
        eps = torch.empty_like(x)  # (B C L): every row is written by exactly one of the two models
        for rows, model in ((t < self.switch, self._low_eps), (t >= self.switch, self._high_eps)):
            if rows.any():
                keep = None if cond_keep is None else cond_keep[rows]
                eps[rows] = model(x[rows], t[rows], labels[rows], demographics[rows], keep).to(x.dtype)
        return eps

    def _low_eps(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, keep: Tensor | None) -> Tensor:
        return self.low(x, t, labels, demographics, keep)

    def _high_eps(self, x: Tensor, t: Tensor, labels: Tensor, demographics: Tensor, keep: Tensor | None) -> Tensor:
        """The high model's x0 estimate at its nearest noise level, as the eps the low schedule implies."""
        t_high = self.high_step[t]
        x0_hat, _ = self.high_diffusion.split_output(x, t_high, self.high(x, t_high, labels, demographics, keep))
        signal = self.low_diffusion.table("sqrt_alphas_cumprod").to(x)[t].view(-1, 1, 1)
        noise = self.low_diffusion.table("sqrt_one_minus_alphas_cumprod").to(x)[t].view(-1, 1, 1)
        return (x - signal * x0_hat) / noise


def main(argv: list[str] | None = None) -> int:
    from common.bundle import load_generator
    from common.config import load
    from common.generate import generate
    from common.plotting import plot_ecg_grid
    from simulations.benchmarks.bench_quality_curve import _held_out, score_generator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low", type=Path, required=True, help="eps checkpoint, run or bundle: the low-noise steps")
    parser.add_argument("--high", type=Path, required=True, help="checkpoint, run or bundle: the high-noise steps")
    parser.add_argument("--switch", type=int, nargs="+", default=[100], help="first timestep (low schedule) of --high")
    parser.add_argument("--config", default="configs/quality_cpu.yaml", help="its validation folds condition the samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    real, floor = _held_out(cfg, args.records)
    low, high = load_generator(args.low), load_generator(args.high)
    if low.cfg.diffusion.prediction != "eps":
        parser.error(f"--low must be an eps model, got prediction {low.cfg.diffusion.prediction!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    samplers = {"low alone": low, "high alone": high}
    for switch in args.switch:
        model = SwitchedDenoiser(low.model, low.diffusion, high.model, high.diffusion, switch).eval()
        samplers[f"switch at t={switch}"] = dataclasses.replace(low, model=model)
    rows = []
    for name, gen in samplers.items():
        row = {"sampler": name, **score_generator(gen, real, floor)}
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        picked = slice(0, 4)
        x12 = generate(gen, real.labels[picked], real.demographics[picked], real.demographics_mask[picked], seed=1,
                       progress=False)
        plot_ecg_grid(x12, args.out / f"{name.replace(' ', '-').replace('=', '')}.png", titles=[name] * 4)
    (args.out / "hybrid.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
