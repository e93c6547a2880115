"""Opacus around the denoiser for one local run: Poisson sampling, per-sample clipping, Gaussian noise.

    private = make_private(model, optimizer, dataset, batch_size, budget, cfg.privacy, multiplicity, randomness)
    for batch in private.loader: ...; private.backward(per_sample_loss); private.optimizer.step()
    private.close(steps)

The noise and the Poisson sampling draw from `DPRandomness`: two torch generators seeded from secret
entropy (the site's ledger key, else the OS), never from the config or anything the server sends. Opacus'
own `secure_mode` needs torchcsprng, which has no build for current torch; instead the optimizer's
`secure_mode` flag is switched on, which makes Opacus sum four Gaussian draws per coordinate (the
floating-point attack mitigation of Holohan et al.) with our secret generator.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.privacy import samplers  # noqa: F401  (registers the S4D grad sampler)
from common.privacy.accounting import SiteBudget
from common.privacy.samplers import merge_noise_draws


@dataclass
class DPRandomness:
    """Secret seeds of one local run: the Poisson sampler, the DP noise, and the training draws (t, eps)."""

    sampling: int
    noise: int
    training: int

    @classmethod
    def from_os_entropy(cls) -> "DPRandomness":
        return cls(secrets.randbits(63), secrets.randbits(63), secrets.randbits(63))

    def generator(self, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(getattr(self, purpose))


class PrivateTraining:
    """The wrapped module, DP optimizer and Poisson loader of one local run, and the two DP-specific steps."""

    def __init__(self, module: nn.Module, optimizer, loader: DataLoader, budget: SiteBudget, ghost: bool,
                 multiplicity: int, engine) -> None:
        self.module = module
        self.optimizer = optimizer
        self.loader = loader
        self.budget = budget
        self.ghost = ghost
        self.multiplicity = multiplicity
        self._engine = engine

    def backward(self, per_sample_loss: torch.Tensor) -> None:
        """Per-sample gradients of the [B] losses, each example's noise draws merged before clipping."""
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the inputs need no grad: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.ghost:
                from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

                DPTensorFastGradientClipping(self.module, self.optimizer, per_sample_loss, "mean").backward()
                return
            per_sample_loss.mean().backward()
        merge_noise_draws(self.module, self.multiplicity)

    def empty_step(self) -> None:
        """A Poisson batch can be empty: the step still happens (noise only) and is accounted."""
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            if self.ghost:
                p.grad = torch.zeros_like(p)  # ghost clipping reads the clipped sum from .grad
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def close(self, steps: int) -> None:
        """Check that Opacus did what the budget says, then remove its hooks from the plain module."""
        if not math.isclose(self.optimizer.noise_multiplier, self.budget.noise_multiplier, rel_tol=1e-12):
            raise RuntimeError("the optimizer's noise multiplier drifted from the planned one")
        opacus_steps = sum(int(n) for _, _, n in self._engine.accountant.history)
        if opacus_steps != steps:
            raise RuntimeError(f"Opacus took {opacus_steps} noisy steps but the loop counted {steps}")
        remove = getattr(self.module, "_close", None)
        if callable(remove):
            remove()


def make_private(model: nn.Module, optimizer, dataset: Dataset, batch_size: int, budget: SiteBudget, privacy,
                 multiplicity: int, randomness: DPRandomness | None = None) -> PrivateTraining:
    """Wrap `model` (the denoiser alone) for DP-SGD at the budget's sample rate, noise and clipping norm."""
    from opacus import PrivacyEngine

    mode = privacy.grad_sample_mode
    if mode not in ("hooks", "functorch", "ghost"):
        raise ValueError(f"privacy.grad_sample_mode={mode!r}: use hooks, functorch or ghost")
    if mode == "ghost" and multiplicity > 1:
        raise ValueError(
            "noise multiplicity > 1 does not work with Opacus' ghost clipping, which clips each row of the "
            "repeated batch (one noise draw) instead of each example; use privacy.grad_sample_mode hooks or "
            "functorch, or midt.noise_multiplicity=1"
        )
    if getattr(model, "activation_checkpointing", False):
        raise RuntimeError(
            "model.activation_checkpointing cannot be combined with Opacus' per-sample gradient hooks: "
            "recomputing a block in backward fires its forward hooks a second time. "
            "Set model.activation_checkpointing=false for private training."
        )
    if len(dataset) != budget.num_records:
        raise ValueError(f"the budget was planned for {budget.num_records} records, the data has {len(dataset)}")
    randomness = randomness or DPRandomness.from_os_entropy()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), generator=randomness.generator("sampling"))
    if not math.isclose(1 / len(loader), budget.sample_rate, rel_tol=1e-9):
        raise RuntimeError(f"Opacus would sample at q={1 / len(loader):.6g}, the budget was planned for q={budget.sample_rate:.6g}")
    # Opacus' accountant only cross-checks the number of noisy steps; epsilon comes from accounting.py.
    with warnings.catch_warnings():
        # Opacus' secure RNG needs torchcsprng; our generators are secret instead (see the module docstring).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="prv")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=budget.noise_multiplier,
            max_grad_norm=budget.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            noise_generator=randomness.generator("noise", device),
        )
    module, dp_optimizer, dp_loader = (wrapped[0], wrapped[1], wrapped[-1])
    dp_optimizer.secure_mode = True
    return PrivateTraining(module, dp_optimizer, dp_loader, budget, mode == "ghost", multiplicity, engine)
