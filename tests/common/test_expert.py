"""The public high-noise expert: the switched denoiser (the low model's eps below the switch, the high model's x0
estimate at and above it), and the expert a config names, loaded, checked and asked by the sampler."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from common.bundle import WEIGHTS, BundleError, build_generator
from common.config import Config, DiffusionConfig, from_dict, to_dict
from common.diffusion import GaussianDiffusion
from common.expert import SwitchedDenoiser
from common.generate import generate
from common.model.denoiser import build_denoiser
from common.normalization import Normalizer, federated_normalizer
from common.run_dir import CHECKPOINTS
from tests.run_configs import write_public_run


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


# -- the configured expert: loaded from a public run, used by the sampler, refused where it does not fit --------

def tiny_cfg(**diffusion) -> Config:
    return from_dict({"model": {"size": "tiny"}, "partition": {"scheme": "site", "num_sites": 2, "public_sites": [0]},
                      "diffusion": {"timesteps": 20, "sample_steps": 4, "expert_from": 10, **diffusion}})


EXPERT_TRAINING = {"prediction": "v", "zero_terminal_snr": True, "train_timesteps": [10, 20]}


@pytest.fixture
def expert_run(tmp_path):
    return write_public_run(tmp_path / "expert", tiny_cfg(**EXPERT_TRAINING))


def test_the_sampler_asks_the_expert_at_and_above_expert_from_and_the_network_below(expert_run):
    cfg = tiny_cfg(expert=str(expert_run), expert_from=10, sampler="ddim", eta=1.0)
    state = build_denoiser(cfg.model).state_dict()
    gen = build_generator(cfg, state, federated_normalizer(), Path("."))
    asked = {"network": [], "expert": []}
    gen.model.register_forward_hook(lambda m, args, out: asked["network"].append(int(args[1][0])))
    gen.expert.model.register_forward_hook(lambda m, args, out: asked["expert"].append(int(args[1][0])))
    codes = np.zeros((2, 71), np.float32)
    demographics, mask = np.zeros((2, 4), np.float32), np.zeros((2, 4), bool)
    with_expert = generate(gen, codes, demographics, mask, seed=3, progress=False)
    # DDIM 4 of T=20 visits t = 19, 13, 6, 0; the expert is asked at its own step of the nearest noise level
    assert asked["network"] == [6, 0] and len(asked["expert"]) == 2
    alone = generate(dataclasses.replace(gen, expert=None), codes, demographics, mask, seed=3, progress=False)
    assert with_expert.shape == alone.shape == (2, 12, 1000) and not np.allclose(with_expert, alone)


def test_an_expert_that_does_not_fit_is_refused_with_the_reason(expert_run, tmp_path):
    state = build_denoiser(tiny_cfg().model).state_dict()
    with pytest.raises(BundleError, match="another partition"):
        other = from_dict({**to_dict(tiny_cfg(expert=str(expert_run))), "partition": {"scheme": "site", "num_sites": 2}})
        build_generator(other, state, federated_normalizer(), Path("."))
    with pytest.raises(BundleError, match="no base.json"):
        build_generator(tiny_cfg(expert=str(tmp_path)), state, federated_normalizer(), Path("."))
    with pytest.raises(BundleError, match="normalizes signals differently"):
        moved = Normalizer.from_dict({**federated_normalizer().to_dict(), "mean": [0.1] * 8})
        build_generator(tiny_cfg(expert=str(expert_run)), state, moved, Path("."))
    with pytest.raises(ValueError, match="answers the high-noise steps of an eps model"):
        GaussianDiffusion(tiny_cfg(expert=str(expert_run), prediction="v").diffusion)
    with pytest.raises(ValueError, match="expert_from must lie in 1..19"):
        GaussianDiffusion(tiny_cfg(expert=str(expert_run), expert_from=20).diffusion)
    tampered = expert_run / CHECKPOINTS / "final" / WEIGHTS
    tampered.write_bytes(tampered.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="not the ones base.json describes"):
        build_generator(tiny_cfg(expert=str(expert_run)), state, federated_normalizer(), Path("."))


def test_a_rhythm_conditioned_expert_follows_beat_times_drawn_from_its_public_table(tmp_path):
    from common.bundle import RHYTHM_JSON
    from common.rhythm import RhythmTable

    table = RhythmTable(100, (("SR",),), np.array([0.8]), np.array([0.0]))
    expert_cfg = from_dict({**to_dict(tiny_cfg(**EXPERT_TRAINING)), "model": {"size": "unet", "channels": 8, "rhythm": True}})
    run = write_public_run(tmp_path / "expert", expert_cfg, rhythm=table)
    cfg = tiny_cfg(expert=str(run), expert_from=10, sampler="ddim", eta=1.0)
    gen = build_generator(cfg, build_denoiser(cfg.model).state_dict(), federated_normalizer(), Path("."))
    assert gen.rhythm_table() is gen.expert.rhythm and gen.expert.provenance["rhythm_sha256"]
    maps = {"network": [], "expert": []}
    gen.model.register_forward_hook(lambda m, args, kwargs, out: maps["network"].append(kwargs.get("rhythm")),
                                    with_kwargs=True)
    gen.expert.model.register_forward_hook(lambda m, args, kwargs, out: maps["expert"].append(kwargs["rhythm"]),
                                           with_kwargs=True)
    codes = np.zeros((3, 71), np.float32)
    codes[:, 59] = 1.0  # SR
    generate(gen, codes, np.zeros((3, 4), np.float32), np.zeros((3, 4), bool), seed=5, progress=False)
    assert maps["network"] == [None, None] and len(maps["expert"]) == 2
    beats = maps["expert"][0][:, 0].numpy()  # (3 L): 0.8 s apart from a random phase, the same at every step
    for row in beats:
        peaks = np.flatnonzero((row[1:-1] > row[:-2]) & (row[1:-1] >= row[2:]) & (row[1:-1] > 0.5)) + 1
        assert np.allclose(np.diff(peaks), 80, atol=1)
    torch.testing.assert_close(maps["expert"][0], maps["expert"][1])
    # the table is part of what base.json describes: another one is refused
    (run / CHECKPOINTS / "final" / RHYTHM_JSON).write_bytes(RhythmTable(100, ((),), np.array([1.0]), np.array([0.0])).to_bytes())
    with pytest.raises(BundleError, match="sha256 differs"):
        build_generator(cfg, build_denoiser(cfg.model).state_dict(), federated_normalizer(), Path("."))
