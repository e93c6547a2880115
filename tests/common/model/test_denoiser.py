"""The SSSD-style denoiser: shapes, presets, conditioning paths, Opacus-readiness, activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import ModelConfig
from common.model.denoiser import PRESETS, Denoiser, build_denoiser, count_parameters, resolve_spec
from common.privacy.samplers import modules_on_functorch_fallback

LENGTH = 200  # the model is length-agnostic; short signals keep these tests fast





def _inputs(batch: int = 3, length: int = LENGTH, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, length, generator=g)
    t = torch.randint(0, 200, (batch,), generator=g)
    labels = (torch.rand(batch, 71, generator=g) < 0.1).float()
    demographics = torch.cat([torch.randn(batch, 4, generator=g), torch.ones(batch, 4)], dim=1)
    return x, t, labels, demographics


def _tiny(seed: int = 0, **overrides) -> Denoiser:
    torch.manual_seed(seed)
    model = build_denoiser(ModelConfig(size="tiny", **overrides))
    nn.init.normal_(model.output_proj.weight, std=0.1)  # undo the zero init so outputs depend on the input
    return model


def test_output_shape_zero_init_and_parameter_counts() -> None:
    model = build_denoiser(ModelConfig(size="tiny"))
    x, t, labels, demographics = _inputs()
    eps = model(x, t, labels, demographics)
    assert eps.shape == x.shape
    assert torch.equal(eps, torch.zeros_like(eps))  # zero-initialised output projection
    assert count_parameters(model) < 1_000_000
    assert 1_000_000 < count_parameters(build_denoiser(ModelConfig(size="small"))) < 10_000_000
    assert model(torch.randn(2, 8, 1000), t[:2], labels[:2], demographics[:2]).shape == (2, 8, 1000)


def test_config_overrides_the_preset() -> None:
    spec = resolve_spec(ModelConfig(size="small", channels=16, blocks=3, state_dim=8, bidirectional=False))
    assert (spec.channels, spec.blocks, spec.state_dim, spec.bidirectional) == (16, 3, 8, False)
    assert spec.step_hidden_dim == PRESETS["small"].step_hidden_dim
    model = build_denoiser(ModelConfig(size="small", channels=16, blocks=3, state_dim=8, bidirectional=False))
    assert len(model.blocks) == 3 and model.blocks[0].s4_before.conv.log_dt.shape == (1, 32)
    with pytest.raises(ValueError, match="state_dim must be an even number"):
        resolve_spec(ModelConfig(size="tiny", state_dim=5))
    with pytest.raises(ValueError, match="blocks must be positive"):
        resolve_spec(ModelConfig(size="tiny", blocks=0))


def test_bad_inputs_name_the_argument() -> None:
    model = build_denoiser(ModelConfig(size="tiny"))
    x, t, labels, demographics = _inputs()
    with pytest.raises(ValueError, match=r"x must be \[B, 8, L\]"):
        model(x[:, :7], t, labels, demographics)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:2], labels, demographics)
    with pytest.raises(ValueError, match="integer diffusion steps"):
        model(x, t.float(), labels, demographics)
    with pytest.raises(ValueError, match="labels must be"):
        model(x, t, labels[:, :70], demographics)
    with pytest.raises(ValueError, match="demographics must be"):
        model(x, t, labels, demographics[:, :4])
    with pytest.raises(ValueError, match="cond_keep must be"):
        model(x, t, labels, demographics, torch.ones(2))


def test_ready_for_opacus_no_buffers_no_batchnorm_no_fallback() -> None:
    model = build_denoiser(ModelConfig(size="small"))
    assert list(model.buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert modules_on_functorch_fallback(model) == []
    assert model.blocks[-1].out_conv.out_channels == 96 and model.blocks[0].out_conv.out_channels == 2 * 96


def test_every_parameter_lies_on_the_loss_path() -> None:
    model = _tiny()
    x, t, labels, demographics = _inputs(batch=4)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])  # both the conditioning and the null embedding are used
    model(x, t, labels, demographics, keep).pow(2).mean().backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert silent == []


def test_conditioning_paths() -> None:
    model = _tiny()
    x, t, labels, demographics = _inputs()
    other_labels = torch.roll(labels, 1, dims=1)
    other_demo = -demographics
    with torch.no_grad():
        kept = model(x, t, labels, demographics)
        torch.testing.assert_close(model(x, t, labels, demographics, torch.ones(3)), kept)
        assert (model(x, t, other_labels, demographics) - kept).abs().max() > 1e-4
        assert (model(x, t, labels, other_demo) - kept).abs().max() > 1e-4
        dropped = model(x, t, labels, demographics, torch.zeros(3))
        torch.testing.assert_close(model(x, t, other_labels, other_demo, torch.zeros(3)), dropped)
        assert (dropped - kept).abs().max() > 1e-4
        # Dropping is per example.
        mixed = model(x, t, labels, demographics, torch.tensor([1.0, 0.0, 1.0]))
        torch.testing.assert_close(mixed[[0, 2]], kept[[0, 2]])
        torch.testing.assert_close(mixed[1], dropped[1])
        assert (model(x, (t + 50) % 200, labels, demographics) - kept).abs().max() > 1e-4


def test_activation_checkpointing_gives_identical_outputs_and_gradients() -> None:
    plain = _tiny(seed=3)
    checkpointed = _tiny(seed=3, activation_checkpointing=True)
    x, t, labels, demographics = _inputs()
    results = []
    for model in (plain, checkpointed):
        out = model(x, t, labels, demographics, torch.tensor([1.0, 0.0, 1.0]))
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-7, rtol=1e-6, msg=name)


