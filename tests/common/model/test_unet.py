"""The U-Net denoiser: shapes, zero-init head, config hook, classifier-free guidance, and exact Opacus
per-sample gradients (eps + mel loss) against a per-example loop."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from opacus.utils.per_sample_gradients_utils import compute_grad_samples_microbatch_and_opacus
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DiffusionConfig, MidtConfig, ModelConfig, from_dict
from common.diffusion import GaussianDiffusion
from common.losses import MelSpectrogramLoss
from common.model.denoiser import build_denoiser, count_parameters
from common.model.s4 import S4DKernelConv
from common.model.unet import UNET_PRESET, UNetDenoiser, UNetSpec, resolve_unet_spec, rotate
from common.privacy.samplers import modules_on_functorch_fallback

LENGTH = 200  # divisible by the stride 4 * 2 * 5 = 40; levels 50 / 25 / 5
TINY = UNetSpec(
    channels=(8, 16, 16), s4_levels=(1, 2), attention_levels=(1, 2), head_dim=8, state_dim=4, step_embed_dim=8,
    embed_dim=16, groups=4,
)


def _tiny(seed: int = 0) -> UNetDenoiser:
    torch.manual_seed(seed)
    model = UNetDenoiser(TINY)
    nn.init.normal_(model.unpatchify.weight, std=0.1)  # undo the zero init so every layer gets gradient
    return model


def _inputs(batch: int = 3, length: int = LENGTH, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, length, generator=g)
    t = torch.randint(0, 200, (batch,), generator=g)
    labels = (torch.rand(batch, 71, generator=g) < 0.1).float()
    demographics = torch.randn(batch, 8, generator=g)
    return x, t, labels, demographics


def test_preset_shape_zero_init_and_opacus_readiness() -> None:
    model = build_denoiser(ModelConfig(size="unet"))
    assert isinstance(model, UNetDenoiser) and model.spec == UNET_PRESET
    assert 1_000_000 < count_parameters(model) < 4_000_000
    assert modules_on_functorch_fallback(model) == []
    x, t, labels, demographics = _inputs(batch=2, length=1000)
    eps = model(x, t, labels, demographics)
    assert eps.shape == (2, 8, 1000)
    assert torch.equal(eps, torch.zeros_like(eps))  # zero-initialised un-patchify conv


def test_config_overrides_and_refusals() -> None:
    assert from_dict({"model": {"size": "unet"}}).model.size == "unet"
    spec = resolve_unet_spec(ModelConfig(size="unet", channels=32, blocks=2, state_dim=8, bidirectional=False))
    ratios = [c / UNET_PRESET.channels[0] for c in UNET_PRESET.channels]
    assert spec.channels == tuple(round(32 * r) for r in ratios)
    assert (spec.res_blocks, spec.state_dim, spec.bidirectional) == (2, 8, False)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        build_denoiser(ModelConfig(size="unet", activation_checkpointing=True))
    with pytest.raises(ValueError, match="multiples of groups"):
        resolve_unet_spec(ModelConfig(size="unet", channels=12))
    with pytest.raises(ValueError, match="include 2"):
        UNetDenoiser(UNetSpec(s4_levels=(0,)))
    wider = build_denoiser(from_dict({"model": {"size": "unet", "s4_levels": [1, 2]}}).model)
    assert wider.spec.s4_levels == (1, 2) and wider.down[1].s4 is not None and wider.up[1].s4 is not None
    assert build_denoiser(ModelConfig(size="unet")).down[1].s4 is None
    with pytest.raises(ValueError, match="s4_levels applies to model.size=unet"):
        build_denoiser(ModelConfig(size="small", s4_levels=(1,)))
    with pytest.raises(ValueError, match="divisible by 40"):
        _tiny()(*_inputs(length=100))


def test_attention_levels_config_and_refusals() -> None:
    model = build_denoiser(from_dict({"model": {"size": "unet", "attention_levels": [1, 2]}}).model)
    assert model.down[1].attention is not None and model.up[1].attention is not None
    assert model.down[2].attention is not None and model.up[0].attention is None  # the bottleneck attends once
    assert model.down[0].attention is None and model.down[1].attention.heads == 128 // 32
    assert build_denoiser(ModelConfig(size="unet")).down[2].attention is None  # off unless configured
    with pytest.raises(ValueError, match="attention_levels"):
        UNetDenoiser(UNetSpec(attention_levels=(3,)))
    with pytest.raises(ValueError, match="head_dim"):
        UNetDenoiser(UNetSpec(attention_levels=(1,), head_dim=48))
    with pytest.raises(ValueError, match="attention_levels applies to model.size=unet"):
        build_denoiser(ModelConfig(size="small", attention_levels=(1,)))


def test_rotary_scores_depend_on_the_offset_only() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)  # one query, one key
    length = 40
    rq, rk = rotate(q.expand(1, 1, length, 16)), rotate(k.expand(1, 1, length, 16))  # (1 1 L d): the same vectors at every position
    scores = rq[0, 0] @ rk[0, 0].T  # (L L): query at i, key at j
    for offset in (0, 3, 17):
        diagonal = torch.diagonal(scores, offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-5)
    assert not torch.allclose(scores[0, 0], scores[0, 5])  # and the offset does change the score
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, length))  # a rotation keeps norms


def test_unpatchify_puts_channel_lead_times_p_plus_offset_at_that_offset() -> None:
    model = UNetDenoiser(TINY)
    patch = TINY.patch
    with torch.no_grad():
        model.unpatchify.bias.copy_(torch.arange(8 * patch, dtype=torch.float32))  # weight stays 0
    eps = model(*_inputs())  # (B 8 L)
    lead, offset = torch.meshgrid(torch.arange(8), torch.arange(LENGTH) % patch, indexing="ij")
    torch.testing.assert_close(eps, (lead * patch + offset).float().expand(3, 8, LENGTH))


def test_classifier_free_guidance_drop_ignores_the_condition() -> None:
    model = _tiny()
    x, t, labels, demographics = _inputs()
    other_labels, other_demographics = _inputs(seed=1)[2:]
    drop = torch.zeros(3)
    dropped = model(x, t, labels, demographics, cond_keep=drop)
    torch.testing.assert_close(model(x, t, other_labels, other_demographics, cond_keep=drop), dropped)
    kept = model(x, t, labels, demographics)
    assert not torch.allclose(model(x, t, other_labels, other_demographics), kept)  # the condition matters
    torch.testing.assert_close(model(x, t, labels, demographics, cond_keep=torch.ones(3)), kept)


class PerExampleLoss(nn.Module):
    """(x0, labels, demographics, t, noise, cond_keep) -> per-example eps + mel loss [B]; Opacus wraps it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _tiny().double()
        self.diffusion = GaussianDiffusion(DiffusionConfig())
        self.mel = MelSpectrogramLoss(MidtConfig(n_fft=(64, 32), hop_length=(16, 8), n_mels=8)).double()

    def forward(
        self, x0: Tensor, labels: Tensor, demographics: Tensor, t: Tensor, noise: Tensor, keep: Tensor
    ) -> Tensor:
        return self.diffusion.training_losses(
            self.model, x0, labels, demographics, mel_loss=self.mel, mel_weight=0.5,
            mel_target="posterior_mean", t=t, noise=noise, cond_keep=keep,
        )["loss"]  # fmt: skip


def _per_example(batch: tuple[Tensor, ...]):
    return (tuple(v[i : i + 1] for v in batch) for i in range(batch[0].shape[0]))


def test_per_sample_gradients_match_a_per_example_loop() -> None:
    loss_module = PerExampleLoss()
    assert modules_on_functorch_fallback(loss_module) == []
    x0, _, labels, demographics = (v.double() if v.is_floating_point() else v for v in _inputs())
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 200, (3,), generator=g)
    noise = torch.randn(3, 8, LENGTH, generator=g, dtype=torch.float64)
    keep = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    batch = (x0, labels, demographics, t, noise, keep)
    for reduction in ("sum", "mean"):
        reference, opacus = compute_grad_samples_microbatch_and_opacus(
            batch, loss_module, loss_reduction=reduction, grad_sample_mode="hooks", chunk_method=_per_example
        )
        assert reference.keys() == opacus.keys() == {n for n, _ in loss_module.named_parameters()}
        for name, expected in reference.items():
            torch.testing.assert_close(opacus[name], expected, atol=1e-9, rtol=1e-6, msg=name)
    s4d = [name for name, m in loss_module.named_modules() if isinstance(m, S4DKernelConv)]
    assert len(s4d) == 3  # level 1 on both paths, the bottleneck once
    for prefix in s4d:
        for param in ("log_dt", "log_A_real", "A_imag", "C", "D"):
            assert reference[f"{prefix}.{param}"].abs().max() > 0  # the comparison is not vacuous
    # Examples 0 and 2 keep the condition, example 1 drops it: only it has a null-embedding gradient.
    null_grad = reference["model.null_cond.weight"].flatten(1).abs().amax(1)
    assert null_grad[1] > 0 and null_grad[0] == 0 and null_grad[2] == 0


def test_one_private_step_changes_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNetDenoiser(TINY)
    diffusion = GaussianDiffusion(DiffusionConfig())
    data = TensorDataset(torch.randn(8, 8, LENGTH), (torch.rand(8, 71) < 0.1).float(), torch.randn(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )  # fmt: skip
    x0, labels, demographics = next(iter(loader))
    losses = diffusion.training_losses(
        private, x0, labels, demographics, mel_loss=MelSpectrogramLoss(MidtConfig()), mel_weight=0.02, cond_dropout=0.5
    )
    losses["loss"].mean().backward()
    assert all(p.grad_sample.shape == (4, *p.shape) for p in model.parameters())
    optimizer.step()
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []  # noise reaches every parameter
