"""Per-sample gradients of the full tiny denoiser under Opacus, with the eps + MIDT mel loss, against a
per-example loop: the registered S4D sampler, the functorch fallback, ghost-clipping norms, noise
multiplicity, and one private optimizer step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.utils.per_sample_gradients_utils import compute_grad_samples_microbatch_and_opacus
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DiffusionConfig, MidtConfig, ModelConfig
from common.config import PrivacyConfig
from common.diffusion import GaussianDiffusion
from common.losses import MelSpectrogramLoss
from common.model.denoiser import build_denoiser
from common.model.s4 import S4DKernelConv
from common.privacy import make_private, plan_budget
from common.privacy.samplers import merge_noise_draws, modules_on_functorch_fallback, s4d_functorch_fallback

LENGTH = 96
MEL_WEIGHT = 0.5  # larger than MIDT's 0.02 so the mel term visibly shapes the gradients




class PerExampleLoss(nn.Module):
    """(x0, labels, demographics, t, noise, cond_keep) -> per-example eps + mel loss [B]; Opacus wraps it whole.

    The random draws are inputs, so a per-example replay sees exactly the same noise and timesteps.
    """

    def __init__(self, multiplicity: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_denoiser(ModelConfig(size="tiny")).double()
        nn.init.normal_(self.model.output_proj.weight, std=0.1)  # leave the zero init so every layer gets gradient
        self.diffusion = GaussianDiffusion(DiffusionConfig())
        self.mel = MelSpectrogramLoss(MidtConfig(n_fft=(64, 32), hop_length=(16, 8), n_mels=8)).double()
        self.multiplicity = multiplicity

    def forward(
        self, x0: Tensor, labels: Tensor, demographics: Tensor, t: Tensor, noise: Tensor, keep: Tensor
    ) -> Tensor:
        return self.diffusion.training_losses(
            self.model,
            x0,
            labels,
            demographics,
            mel_loss=self.mel,
            mel_weight=MEL_WEIGHT,
            mel_target="posterior_mean",
            noise_multiplicity=self.multiplicity,
            t=t,
            noise=noise,
            cond_keep=keep,
        )["loss"]


def _batch(batch: int = 3, multiplicity: int = 1, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    draws = (batch, multiplicity) if multiplicity > 1 else (batch,)
    return (
        torch.randn(batch, 8, LENGTH, generator=g, dtype=torch.float64),
        (torch.rand(batch, 71, generator=g) < 0.2).double(),
        torch.randn(batch, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 200, draws, generator=g),
        torch.randn(*draws, 8, LENGTH, generator=g, dtype=torch.float64),
        (torch.rand(draws, generator=g) > 0.4).double(),
    )


def _per_example(batch: tuple[Tensor, ...]):
    return (tuple(v[i : i + 1] for v in batch) for i in range(batch[0].shape[0]))


def _loop_grads(module: PerExampleLoss, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Reference: one backward pass per example."""
    rows: dict[str, list[Tensor]] = {name: [] for name, _ in module.named_parameters()}
    for example in _per_example(batch):
        module.zero_grad()
        module(*example).sum().backward()
        for name, param in module.named_parameters():
            rows[name].append(param.grad.detach().clone())
    return {name: torch.stack(grads) for name, grads in rows.items()}


def _assert_same(reference: dict[str, Tensor], opacus: dict[str, Tensor]) -> None:
    assert reference.keys() == opacus.keys()
    for name, expected in reference.items():
        torch.testing.assert_close(opacus[name], expected, atol=1e-9, rtol=1e-6, msg=name)


@pytest.mark.parametrize("s4d_path", ["sampler", "functorch_fallback"])
def test_full_denoiser_per_sample_gradients_with_mel_loss(s4d_path: str) -> None:
    loss_module = PerExampleLoss()
    assert modules_on_functorch_fallback(loss_module) == []
    batch = _batch()
    fallback = s4d_functorch_fallback() if s4d_path == "functorch_fallback" else contextlib.nullcontext()
    with fallback:
        for reduction in ("sum", "mean"):
            reference, opacus = compute_grad_samples_microbatch_and_opacus(
                batch, loss_module, loss_reduction=reduction, grad_sample_mode="hooks", chunk_method=_per_example
            )
            _assert_same(reference, opacus)
    names = ("log_dt", "log_A_real", "A_imag", "C", "D")
    s4d_grads = [reference[f"model.blocks.0.s4_after.conv.{name}"] for name in names]
    assert all(g.abs().max() > 0 for g in s4d_grads)  # the comparison is not vacuous


def test_ghost_clipping_norms_match_the_loop() -> None:
    loss_module = PerExampleLoss()
    batch = _batch(batch=4, seed=1)
    reference = _loop_grads(loss_module, batch)
    expected_norms = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()]).norm(dim=0)  # (B)
    wrapped = GradSampleModuleFastGradientClipping(loss_module, loss_reduction="sum", use_ghost_clipping=True)
    wrapped(*batch).sum().backward()
    torch.testing.assert_close(wrapped.get_norm_sample(), expected_norms, atol=1e-9, rtol=1e-6)
    wrapped._close()


class DenoiserOnly(nn.Module):
    """Opacus wraps the denoiser alone (as training does); the loss is computed outside the wrapper."""

    def __init__(self, inner: PerExampleLoss) -> None:
        super().__init__()
        self.inner = inner

    def loss(self, wrapped: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        x0, labels, demographics, t, noise, keep = batch
        return self.inner.diffusion.training_losses(
            wrapped, x0, labels, demographics, mel_loss=self.inner.mel, mel_weight=MEL_WEIGHT,
            noise_multiplicity=self.inner.multiplicity, t=t, noise=noise, cond_keep=keep,
        )["loss"]  # fmt: skip


def test_noise_multiplicity_gradients_are_merged_per_example_before_clipping() -> None:
    loss_module = PerExampleLoss(multiplicity=2)
    batch = _batch(batch=3, multiplicity=2, seed=2)
    reference = {name.removeprefix("model."): g for name, g in _loop_grads(loss_module, batch).items()}
    wrapped = GradSampleModule(loss_module.model, loss_reduction="mean")
    DenoiserOnly(loss_module).loss(wrapped, batch).mean().backward()
    merge_noise_draws(loss_module.model, 2)  # what the engine does between backward and the optimizer step
    # The denoiser saw B*K = 6 rows; clipping must see one gradient per example.
    _assert_same(reference, {name: p.grad_sample for name, p in loss_module.model.named_parameters()})
    wrapped._close()


def test_merge_noise_draws_checks_the_row_count() -> None:
    layer = nn.Linear(2, 2)
    layer.weight.grad_sample = torch.arange(6.0).reshape(6, 1, 1).expand(6, 2, 2)
    merge_noise_draws(layer, 3)
    torch.testing.assert_close(layer.weight.grad_sample[:, 0, 0], torch.tensor([1.0, 4.0]))
    layer.weight.grad_sample = torch.zeros(6, 2, 2)
    with pytest.raises(ValueError, match="not a multiple of K=4"):
        merge_noise_draws(layer, 4)


def _engine_inputs(privacy: PrivacyConfig, model_cfg: ModelConfig = ModelConfig(size="tiny")):
    model = build_denoiser(model_cfg)
    data = TensorDataset(torch.randn(8, 8, LENGTH), torch.zeros(8, 71), torch.zeros(8, 8))
    budget = plan_budget("s", privacy, 4, len(data), planned_steps=2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), data, budget


def test_noise_multiplicity_is_refused_with_ghost_clipping() -> None:
    privacy = PrivacyConfig(noise_multiplier=1.0, grad_sample_mode="ghost")
    model, optimizer, data, budget = _engine_inputs(privacy)
    with pytest.raises(ValueError, match="ghost clipping"):
        make_private(model, optimizer, data, 4, budget, privacy, multiplicity=2)


def test_activation_checkpointing_is_refused_under_dp() -> None:
    privacy = PrivacyConfig(noise_multiplier=1.0)
    model, optimizer, data, budget = _engine_inputs(privacy, ModelConfig(size="tiny", activation_checkpointing=True))
    with pytest.raises(RuntimeError, match="activation_checkpointing cannot be combined with Opacus"):
        make_private(model, optimizer, data, 4, budget, privacy, multiplicity=1)


def test_one_private_step_with_opacus() -> None:
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(size="tiny"))
    diffusion = GaussianDiffusion(DiffusionConfig())
    mel = MelSpectrogramLoss(MidtConfig())
    data = TensorDataset(torch.randn(8, 8, LENGTH), (torch.rand(8, 71) < 0.1).float(), torch.randn(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    x0, labels, demographics = next(iter(loader))
    losses = diffusion.training_losses(
        private, x0, labels, demographics, mel_loss=mel, mel_weight=0.02, cond_dropout=0.5
    )
    losses["loss"].mean().backward()
    conv = next(m for m in model.modules() if isinstance(m, S4DKernelConv))
    assert conv.C.grad_sample.shape == (4, *conv.C.shape)
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)  # noise reaches every parameter
    assert engine.get_epsilon(delta=1e-5) > 0


def test_private_backward_under_bf16_autocast_keeps_s4d_and_mel_in_float32() -> None:
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(size="tiny"))
    nn.init.normal_(model.output_proj.weight, std=0.1)
    conv = model.blocks[0].s4_before.conv
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            seen.setdefault(name, output.dtype)

        return hook

    conv.register_forward_hook(record("s4d"))
    model.blocks[0].s4_before.output_linear.register_forward_hook(record("linear"))
    wrapped = GradSampleModule(model)
    diffusion = GaussianDiffusion(DiffusionConfig())
    x0, labels, demographics = torch.randn(3, 8, LENGTH), (torch.rand(3, 71) < 0.1).float(), torch.randn(3, 8)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        losses = diffusion.training_losses(
            wrapped, x0, labels, demographics, mel_loss=MelSpectrogramLoss(MidtConfig()), mel_weight=0.02
        )
    losses["loss"].mean().backward()
    assert seen == {"s4d": torch.float32, "linear": torch.bfloat16}  # autocast is on, yet S4D stays float32
    assert losses["mel"].dtype == torch.float32 and torch.isfinite(losses["loss"]).all()
    assert conv.C.grad_sample.dtype == torch.float32 and torch.isfinite(conv.C.grad_sample).all()
    wrapped._close()


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),  # the U-Net blocks
    dict(kernel_size=4, stride=4),  # the patch stem and the downsampling
    dict(kernel_size=1),  # the 1x1 projections
    dict(kernel_size=3, padding=2, dilation=2, stride=2, bias=False),
    dict(kernel_size=3, padding="same"),  # Opacus' own sampler
    dict(kernel_size=3, padding=1, groups=2),  # Opacus' own sampler
], ids=["k3", "patch", "1x1", "dilated-strided", "same", "grouped"])
def test_the_conv1d_sampler_gives_the_per_example_gradients(conv: dict) -> None:
    from common.privacy.samplers import _conv1d_grad_sampler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, **conv), nn.SiLU(), nn.Flatten(), nn.LazyLinear(1)).double()
    x = torch.randn(5, 4, 24, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv1d] is _conv1d_grad_sampler
    for reduction in ("sum", "mean"):
        reference, opacus = compute_grad_samples_microbatch_and_opacus(
            x, model, loss_reduction=reduction, grad_sample_mode="hooks")
        for name, expected in reference.items():
            torch.testing.assert_close(opacus[name], expected, atol=1e-10, rtol=1e-8, msg=name)
        assert reference["0.weight"].abs().max() > 0
