"""The one training loop: determinism, secret DP randomness, empty Poisson batches, virtual steps, FedProx, EMA."""

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common.config import ConfigError, from_dict
from common.diffusion import GaussianDiffusion
from common.model.denoiser import build_denoiser
from common.privacy import DPRandomness, plan_budget
from common.train import EMA, TrainingData, train_local


def _data(n=24, length=250, seed=0):  # 2.5 s records: what these tests check does not depend on length
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 10, length)
    base = torch.sin(2 * math.pi * 1.2 * t)[None, None, :].repeat(n, 8, 1)
    signals = base + 0.1 * torch.randn(n, 8, length, generator=g)
    labels = (torch.rand(n, 71, generator=g) < 0.05).float()
    demographics = torch.zeros(n, 8)
    return TrainingData(signals, labels, demographics)


def _cfg(train=None, **privacy):
    return from_dict({
        "model": {"size": "tiny"},
        "diffusion": {"timesteps": 50},
        "train": {"batch_size": 8, "lr": 1e-3, "device": "cpu", "log_every": 1, **(train or {})},
        "privacy": privacy,
    })


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_deterministic_under_seed_on_cpu():
    cfg = _cfg(enabled=False)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_denoiser(cfg.model)
        train_local(model, GaussianDiffusion(cfg.diffusion), _data(), cfg, steps=3, seed=7, progress=False)
        results.append(_weights(model))
    assert torch.equal(results[0], results[1])


def _private_run(cfg, data, randomness=None, seed=0, steps=3):
    budget = plan_budget("a", cfg.privacy, cfg.train.batch_size, len(data), planned_steps=steps)
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    result = train_local(model, GaussianDiffusion(cfg.diffusion), data, cfg, steps=steps, budget=budget,
                         randomness=randomness, seed=seed, progress=False)
    return model, result


@pytest.mark.slow
def test_private_training_noise_is_secret_and_replays_only_with_the_secret():
    cfg = _cfg(target_epsilon=5.0)
    data = _data()
    # Everything public is the same (config, seed, data): without the site's secret the weights differ.
    a, result = _private_run(cfg, data)
    b, _ = _private_run(cfg, data)
    assert result.steps == 3
    assert not torch.equal(_weights(a), _weights(b))
    # The same secret randomness replays the run bit for bit (a site's own resume), whatever the public seed.
    secret = DPRandomness(sampling=11, noise=12, training=13)
    c, _ = _private_run(cfg, data, secret, seed=1)
    d, _ = _private_run(cfg, data, secret, seed=2)
    assert torch.equal(_weights(c), _weights(d))
    # Hooks are removed after the round: the plain module is reusable and serializable.
    assert not any(getattr(p, "grad_sample", None) is not None for p in c.parameters())
    assert set(c.state_dict()) == set(build_denoiser(cfg.model).state_dict())


def test_proximal_step_pulls_towards_the_global_weights():
    cfg = _cfg(enabled=False)
    drift = {}
    for mu in (0.0, 50.0):
        torch.manual_seed(0)
        model = build_denoiser(cfg.model)
        start = _weights(model).clone()
        train_local(model, GaussianDiffusion(cfg.diffusion), _data(), cfg, steps=4, proximal_mu=mu, seed=1, progress=False)
        drift[mu] = float((_weights(model) - start).norm())
    assert drift[50.0] < drift[0.0]


def test_ema_warms_up_so_short_runs_follow_the_weights():
    cfg = _cfg(enabled=False)
    model = build_denoiser(cfg.model)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(100):
        ema.update(model)
    name, value = next((k, v) for k, v in model.state_dict().items() if v.is_floating_point())
    # Without warm-up, 0.999 ** 100 = 90% of the initial weights would remain; with it, under 10%.
    assert torch.allclose(ema.shadow[name], value, atol=0.1)


def test_ema_tracks_weights():
    cfg = _cfg(enabled=False)
    model = build_denoiser(cfg.model)
    ema = EMA(model, decay=0.5)
    train_local(model, GaussianDiffusion(cfg.diffusion), _data(), cfg, steps=2, ema=ema, progress=False)
    name, value = next((k, v) for k, v in model.state_dict().items() if v.is_floating_point() and v.abs().sum() > 0)
    assert not torch.equal(ema.shadow[name], value)
    ema.copy_to(model)
    assert torch.equal(model.state_dict()[name], ema.shadow[name])


def test_empty_training_set_is_an_error():
    cfg = _cfg(enabled=False)
    empty = TrainingData(torch.zeros(0, 8, 1000), torch.zeros(0, 71), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="no training records"):
        train_local(build_denoiser(cfg.model), GaussianDiffusion(cfg.diffusion), empty, cfg, steps=1, progress=False)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_still_step_and_count(mode):
    # q = 1/24 over 24 records: about a third of Poisson batches are empty; each is a noise-only step.
    cfg = from_dict({
        "model": {"size": "tiny"}, "diffusion": {"timesteps": 50},
        "train": {"batch_size": 1, "device": "cpu"},
        "privacy": {"target_epsilon": 50.0, "noise_multiplier": 1.0, "grad_sample_mode": mode},
    })
    data = _data(n=24)
    model, result = _private_run(cfg, data, DPRandomness(1, 2, 3), steps=8)
    assert result.steps == 8
    assert result.empty_batches > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _ExampleKeyedDiffusion(GaussianDiffusion):
    """Each example's (t, noise) is a function of the example, so a batch split into passes draws the same."""

    def training_losses(self, model, x0, labels, demographics, **kwargs):
        t = (x0[:, 0, 0].abs() * 1e4).long() % self.num_timesteps
        noise = torch.sin(37.0 * x0 + 1.0)
        keep = torch.ones(x0.shape[0])
        return super().training_losses(model, x0, labels, demographics, t=t, noise=noise, cond_keep=keep, **kwargs)


def _split_run(mode: str | None, physical: int, steps: int = 2) -> tuple[list[torch.Tensor], object]:
    """The gradient AdamW steps with at each step (under DP: clipped, summed, noised, scaled) and the result."""
    privacy = {"target_epsilon": 5.0, "noise_multiplier": 1.0, "grad_sample_mode": mode} if mode else {"enabled": False}
    cfg = _cfg({"max_physical_batch_size": physical}, **privacy)
    data = _data()
    budget = plan_budget("a", cfg.privacy, cfg.train.batch_size, len(data), planned_steps=steps) if mode else None
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    stepped = []

    def record(optimizer, args, kwargs):
        if type(optimizer) is torch.optim.AdamW:  # the inner optimizer: what it sees is the final gradient
            stepped.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]))

    hook = register_optimizer_step_pre_hook(record)
    try:
        result = train_local(model, _ExampleKeyedDiffusion(cfg.diffusion), data, cfg, steps=steps, budget=budget,
                             randomness=DPRandomness(21, 22, 23), seed=5, progress=False)
    finally:
        hook.remove()
    return stepped, result


@pytest.mark.parametrize("mode", [None, "hooks", "ghost"])
def test_virtual_steps_take_the_step_of_the_whole_batch(mode):
    # The same batches in passes of at most 3 examples: one clipped, noised (once) and accounted step per batch.
    whole, whole_result = _split_run(mode, physical=0)
    split, split_result = _split_run(mode, physical=3)
    assert split_result.examples == whole_result.examples > 3 * split_result.steps  # batches did split
    assert len(split) == len(whole) == split_result.steps == 2  # under DP, close() checked Opacus accounted 2
    # The first step starts from the same weights: its gradient is the whole batch's, up to float rounding.
    torch.testing.assert_close(split[0], whole[0], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(whole[0], whole[1], rtol=1e-2, atol=1e-5)  # the comparison can tell steps apart


def test_a_negative_physical_batch_size_is_an_error():
    with pytest.raises(ConfigError, match="max_physical_batch_size"):
        from_dict({"train": {"max_physical_batch_size": -1}})


def test_learning_rate_warms_up_and_decays_to_zero():
    from common.train import lr_factor

    assert [lr_factor(n, 100, 4, "none") for n in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 100, 0, "cosine") == 1.0
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("private", [False, True])
def test_a_declared_parameter_subset_trains_and_the_rest_stays_put(private):
    # A fixed noise multiplier: the subset is under test here, not the calibration (tests/common/privacy).
    cfg = _cfg(**({"target_epsilon": 5.0, "noise_multiplier": 1.0} if private else {"enabled": False}))
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    budget = plan_budget("a", cfg.privacy, 8, 24, planned_steps=2) if private else None
    train_local(model, GaussianDiffusion(cfg.diffusion), _data(), cfg, steps=2, budget=budget, lr=1e-2,
                trainable=("output_proj",), progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(n.startswith("output_proj") for n in moved)


def test_an_unknown_trainable_prefix_is_an_error():
    cfg = _cfg(enabled=False)
    with pytest.raises(ValueError, match="no_such_layer.*match no parameter"):
        train_local(build_denoiser(cfg.model), GaussianDiffusion(cfg.diffusion), _data(), cfg, steps=1,
                    trainable=("no_such_layer",), progress=False)
