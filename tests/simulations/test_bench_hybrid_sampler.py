"""The switched denoiser: the low model's eps below the switch, the high model's x0 estimate at and above it."""

import torch

from common.config import DiffusionConfig
from common.diffusion import GaussianDiffusion
from simulations.benchmarks.bench_hybrid_sampler import SwitchedDenoiser


class Affine(torch.nn.Module):
    """A stand-in denoiser whose output is a fixed function of its input and step."""

    in_channels = 8

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x, t, labels, demographics, cond_keep=None):
        return self.scale * x + 0.01 * t.view(-1, 1, 1).to(x)


def test_each_side_of_the_switch_answers_with_its_own_model():
    low_diffusion = GaussianDiffusion(DiffusionConfig(beta_end=0.06))
    high_diffusion = GaussianDiffusion(DiffusionConfig(beta_end=0.06, prediction="v", zero_terminal_snr=True))
    low, high = Affine(0.5), Affine(-0.3)
    model = SwitchedDenoiser(low, low_diffusion, high, high_diffusion, switch=100)
    x = torch.randn(4, 8, 40, dtype=torch.float64)
    t = torch.tensor([0, 99, 100, 180])
    labels, demographics = torch.zeros(4, 71), torch.zeros(4, 8)
    eps = model(x, t, labels, demographics)
    torch.testing.assert_close(eps[:2], low(x[:2], t[:2], labels[:2], demographics[:2]))
    # above the switch, the eps handed to the low schedule implies exactly the high model's x0 estimate
    t_high = model.high_step[t[2:]]
    abar_low, abar_high = low_diffusion.table("alphas_cumprod"), high_diffusion.table("alphas_cumprod")
    assert torch.all((abar_high[t_high] - abar_low[t[2:]]).abs() < 0.01)  # the nearest noise level
    x0_high, _ = high_diffusion.split_output(x[2:], t_high, high(x[2:], t_high, labels[2:], demographics[2:]))
    torch.testing.assert_close(low_diffusion.predict_x0(x[2:], t[2:], eps[2:]), x0_high)
