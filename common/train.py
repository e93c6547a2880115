"""THE local training loop. The federated client, the central baseline and the benchmarks all call it.

    result = train_local(model, diffusion, data, cfg, steps=100, budget=budget)

With a `SiteBudget` the denoiser (and only the denoiser) is made private by common.privacy: Poisson sampling
at the budget's sample rate, per-sample clipping at C, Gaussian noise at sigma, all from secret randomness
(`randomness`, else fresh OS entropy). The caller decides how many steps the budget affords (a site's
ledger reserves them on disk first); the loop takes exactly that many.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common.config import Config
from common.data.dataset import ECGDataset
from common.data.demographics import encode_demographics
from common.diffusion import GaussianDiffusion
from common.losses import MelSpectrogramLoss
from common.normalization import Normalizer
from common.privacy import DPRandomness, SiteBudget, make_private


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainingData:
    """Model-ready tensors: normalized 8-lead signals, multi-hot labels, encoded demographics."""

    signals: torch.Tensor  # [N, 8, L] normalized
    labels: torch.Tensor  # [N, 71]
    demographics: torch.Tensor  # [N, 8]

    @classmethod
    def from_dataset(cls, dataset: ECGDataset, normalizer: Normalizer) -> "TrainingData":
        return cls(
            signals=torch.from_numpy(normalizer.normalize(dataset.signals).astype(np.float32)),
            labels=torch.from_numpy(dataset.labels.astype(np.float32)),
            demographics=torch.from_numpy(
                encode_demographics(dataset.demographics, dataset.demographics_mask).astype(np.float32)
            ),
        )

    def __len__(self) -> int:
        return int(self.signals.shape[0])


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs are not
    dominated by the (zero-output) initial weights: 0.999 ** 100 would still keep 90% of them.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for name, value in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1.0 - decay)

    def copy_to(self, module: nn.Module) -> None:
        state = module.state_dict()
        state.update({k: v.clone() for k, v in self.shadow.items()})
        module.load_state_dict(state)


@dataclass
class TrainResult:
    steps: int
    examples: int  # examples actually drawn (Poisson batches vary in size)
    loss: float
    eps_loss: float
    mel_loss: float
    seconds: float
    log: list[dict[str, float]] = field(default_factory=list)
    empty_batches: int = 0  # Poisson batches with no example: noise-only steps


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    return factor


def select_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze every parameter whose name starts with none of `prefixes` (empty: train all); the trained ones.

    Under DP only the trained parameters are clipped and noised: fewer noised coordinates per step.
    """
    names = [name for name, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(name.startswith(p) for name in names)]
    if unknown:
        roots = sorted({name.split(".")[0] for name in names})
        raise ValueError(f"federation.trainable: {unknown} match no parameter (top-level modules: {roots})")
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(not prefixes or any(name.startswith(p) for p in prefixes))
        if param.requires_grad:
            trained.append(param)
    return trained


def _batches(loader: DataLoader):
    while True:
        yield from loader


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def train_local(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    data: TrainingData,
    cfg: Config,
    steps: int,
    *,
    budget: SiteBudget | None = None,
    randomness: DPRandomness | None = None,
    ema: EMA | None = None,
    proximal_mu: float = 0.0,
    lr: float | None = None,
    trainable: tuple[str, ...] = (),
    seed: int | None = None,
    schedule: bool = False,
    progress: bool = True,
    description: str = "train",
    on_log: Callable[[dict[str, float], torch.optim.Optimizer], None] | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train `model` in place for `steps` optimizer steps (DP-SGD when a budget is given).

    `schedule` applies train.warmup_steps and train.lr_decay over these `steps` (central runs; a federated
    round is too short a span for a schedule of its own). `lr` overrides train.lr; `trainable` names the
    parameter-name prefixes to train (empty: all), the rest stay frozen. `on_log(row, optimizer)` runs every
    train.log_every steps. A resumed run passes `start_step` (steps already taken of `steps`) and the
    optimizer's saved state; its batches and draws continue from a seed offset by `start_step`.
    """
    tc = cfg.train
    if len(data) == 0:
        raise ValueError("no training records")
    device = select_device(tc.device)
    if budget is not None:
        # Private: every draw (t, eps, dropout, sampling, noise) comes from secret randomness, never the config.
        randomness = randomness or DPRandomness.from_os_entropy()
        seed = randomness.training
    if start_step and budget is not None:
        raise ValueError("a DP run resumes per federated round, not inside train_local")
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step={start_step} must lie in [0, {steps})")
    seed = (tc.seed if seed is None else seed) + start_step
    torch.manual_seed(seed)
    model.to(device)
    model.train()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else None

    mel_loss = MelSpectrogramLoss(cfg.midt).to(device) if cfg.midt.enabled and cfg.midt.weight > 0 else None
    dataset = TensorDataset(data.signals, data.labels, data.demographics)
    lr = tc.lr if lr is None else lr
    optimizer = torch.optim.AdamW(select_trainable(model, trainable), lr=lr, weight_decay=tc.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the schedule below restarts from the configured base rate
            group["lr"] = lr
            group.pop("initial_lr", None)
    private = None
    if budget is not None:
        private = make_private(model, optimizer, dataset, tc.batch_size, budget, cfg.privacy,
                               cfg.midt.noise_multiplicity, randomness)
        trained, optimizer, loader = private.module, private.optimizer, private.loader
    else:
        trained = model
        loader = DataLoader(dataset, batch_size=min(tc.batch_size, len(data)), shuffle=True,
                            generator=torch.Generator().manual_seed(seed))

    scheduler = None
    if schedule and (tc.warmup_steps > 0 or tc.lr_decay != "none"):
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: lr_factor(n + start_step, steps, tc.warmup_steps, tc.lr_decay))
    totals = {"loss": 0.0, "eps": 0.0, "mel": 0.0}
    examples = 0
    empty_batches = 0
    log: list[dict[str, float]] = []
    window = {"loss": 0.0, "eps": 0.0, "mel": 0.0, "n": 0}
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=start_step, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    batches = _batches(loader)
    for step in range(start_step + 1, steps + 1):
        x0, labels, demographics = (t.to(device, non_blocking=True) for t in next(batches))
        examples += int(x0.shape[0])
        optimizer.zero_grad(set_to_none=True)
        if x0.shape[0] == 0:
            private.empty_step()
            if scheduler is not None:
                scheduler.step()
            empty_batches += 1
            bar.update(1)
            continue
        with _autocast(device, tc.mixed_precision):
            losses = diffusion.training_losses(
                trained,
                x0,
                labels,
                demographics,
                mel_loss=mel_loss,
                mel_weight=cfg.midt.weight if mel_loss is not None else 0.0,
                mel_target=cfg.midt.target,
                cond_dropout=cfg.model.cond_dropout,
                noise_multiplicity=cfg.midt.noise_multiplicity,
            )
        per_sample = losses["loss"].float()  # [B]: DP clips per example
        if private is not None:
            private.backward(per_sample)
        else:
            per_sample.mean().backward()
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], tc.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if anchor is not None:
            # FedProx as a decoupled proximal step: data-independent, so it costs no privacy.
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.sub_(lr * proximal_mu * (p - anchor[name]))
        if ema is not None:
            ema.update(model)

        batch_loss = float(per_sample.detach().mean())
        batch_eps = float(losses["eps"].detach().float().mean())
        batch_mel = float(losses["mel"].detach().float().mean())
        if not math.isfinite(batch_loss):
            raise FloatingPointError(f"{description}: loss became {batch_loss} at step {step}")
        for key, value in (("loss", batch_loss), ("eps", batch_eps), ("mel", batch_mel)):
            totals[key] += value
            window[key] += value
        window["n"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{batch_loss:.4f}", mel=f"{batch_mel:.3f}")
        if step % max(1, tc.log_every) == 0 or step == steps:
            row = {
                "step": float(step),
                "loss": window["loss"] / max(1, window["n"]),
                "eps_loss": window["eps"] / max(1, window["n"]),
                "mel_loss": window["mel"] / max(1, window["n"]),
                "seconds": time.perf_counter() - start,
            }
            log.append(row)
            if on_log is not None:
                on_log(row, optimizer)
            window = {"loss": 0.0, "eps": 0.0, "mel": 0.0, "n": 0}
    bar.close()
    if private is not None:
        private.close(steps)
    taken = max(1, steps - start_step - empty_batches)
    return TrainResult(
        steps=steps,
        examples=examples,
        loss=totals["loss"] / taken,
        eps_loss=totals["eps"] / taken,
        mel_loss=totals["mel"] / taken,
        seconds=time.perf_counter() - start,
        log=log,
        empty_batches=empty_batches,
    )
