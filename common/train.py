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
from typing import Any, Callable

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
from common.privacy.engine import PrivateTraining
from common.rhythm import beat_maps


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainingData:
    """Model-ready tensors: normalized 8-lead signals, multi-hot labels, encoded demographics and, for a
    rhythm-conditioned model, each record's beat map (common/rhythm.py)."""

    signals: torch.Tensor  # [N, 8, L] normalized
    labels: torch.Tensor  # [N, 71]
    demographics: torch.Tensor  # [N, 8]
    rhythm: torch.Tensor | None = None  # [N, 1, L]

    @classmethod
    def from_dataset(cls, dataset: ECGDataset, normalizer: Normalizer,
                     beats: list[np.ndarray] | None = None) -> "TrainingData":
        """`beats`: each record's R-peak sample indices (`record_beats`), for a rhythm-conditioned model."""
        maps = None if beats is None else torch.from_numpy(beat_maps(beats, dataset.signals.shape[-1]))
        return cls(
            signals=torch.from_numpy(normalizer.normalize(dataset.signals).astype(np.float32)),
            labels=torch.from_numpy(dataset.labels.astype(np.float32)),
            demographics=torch.from_numpy(
                encode_demographics(dataset.demographics, dataset.demographics_mask).astype(np.float32)
            ),
            rhythm=maps,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What one batch holds, in this order: signals, labels, demographics[, rhythm]."""
        base = (self.signals, self.labels, self.demographics)
        return base if self.rhythm is None else (*base, self.rhythm)

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
    device, randomness, seed = _start(model, data, tc, steps, start_step, budget, randomness, seed)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if proximal_mu > 0 else None
    mel_loss = MelSpectrogramLoss(cfg.midt).to(device) if cfg.midt.enabled and cfg.midt.weight > 0 else None
    lr = tc.lr if lr is None else lr
    loop = _build_loop(model, data, cfg, lr, trainable, optimizer_state, budget, randomness, seed)
    scheduler = _scheduler(loop.optimizer, tc, schedule, steps, start_step)
    meter = _Meter()
    bar = tqdm(total=steps, initial=start_step, desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    batches = _batches(loop.loader)
    for step in range(start_step + 1, steps + 1):
        x0, labels, demographics, *rhythm = (t.to(device, non_blocking=True) for t in next(batches))
        meter.examples += int(x0.shape[0])
        loop.optimizer.zero_grad(set_to_none=True)
        if x0.shape[0] == 0:  # an empty Poisson batch: the noise-only step DP-SGD still owes
            _empty_step(loop, scheduler, meter)
            bar.update(1)
            continue
        per_sample, losses = _learn(loop, diffusion, x0, labels, demographics, rhythm[0] if rhythm else None, cfg,
                                    mel_loss, scheduler)
        _after_step(model, anchor, lr * proximal_mu, ema)
        batch = meter.add(per_sample, losses, step, description)
        bar.update(1)
        bar.set_postfix(loss=f"{batch['loss']:.4f}", mel=f"{batch['mel']:.3f}")
        if step % max(1, tc.log_every) == 0 or step == steps:
            _log(meter, step, loop.optimizer, on_log)
    bar.close()
    if loop.private is not None:
        loop.private.close(steps)
    return meter.result(steps, taken=max(1, steps - start_step - meter.empty_batches))


def _empty_step(loop: _Loop, scheduler, meter: _Meter) -> None:
    """Noise alone (the step still counts for the accountant and the schedule)."""
    loop.private.empty_step()
    _advance(scheduler)
    meter.empty_batches += 1


def _learn(loop: _Loop, diffusion: GaussianDiffusion, x0: torch.Tensor, labels: torch.Tensor, demographics: torch.Tensor,
           rhythm: torch.Tensor | None, cfg: Config, mel_loss: MelSpectrogramLoss | None,
           scheduler) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on a non-empty batch; its per-example losses [B] and the loss terms.

    With train.max_physical_batch_size the batch runs in passes of at most that many examples (virtual
    steps). Under DP every pass is clipped per example and added to Opacus' running sum, which is noised
    once, at the last pass: the step, its noise and the sample rate the accountant sees are the whole
    batch's. Without DP the passes' gradients add up to the batch mean's.
    """
    size = x0.shape[0]
    physical = cfg.train.max_physical_batch_size or size
    passes = []
    for start in range(0, size, physical):
        part = slice(start, start + physical)
        with _autocast(x0.device, cfg.train.mixed_precision):
            losses = _losses(diffusion, loop.trained, x0[part], labels[part], demographics[part],
                             None if rhythm is None else rhythm[part], cfg, mel_loss)
        per_sample = losses["loss"].float()  # [b]: DP clips per example
        _backward(loop, per_sample, share=per_sample.shape[0] / size)
        if start + physical < size:
            _accumulate(loop)
        passes.append({key: value.detach() for key, value in losses.items()} | {"per_sample": per_sample.detach()})
    _step(loop, cfg.train.grad_clip, scheduler)
    joined = {key: torch.cat([p[key] for p in passes]) for key in passes[0]}  # each [B]
    return joined.pop("per_sample"), joined


def _after_step(model: nn.Module, anchor: dict[str, torch.Tensor] | None, rate: float, ema: EMA | None) -> None:
    """What follows the optimizer step, both data-independent: the FedProx pull, then the EMA update."""
    _proximal_step(model, anchor, rate)
    if ema is not None:
        ema.update(model)


def _log(meter: _Meter, step: int, optimizer: torch.optim.Optimizer,
         on_log: Callable[[dict[str, float], torch.optim.Optimizer], None] | None) -> None:
    """Close the meter's window into a log row and hand it to `on_log`."""
    row = meter.log_row(step)
    if on_log is not None:
        on_log(row, optimizer)


def _start(model: nn.Module, data: TrainingData, tc: Any, steps: int, start_step: int, budget: SiteBudget | None,
           randomness: DPRandomness | None, seed: int | None) -> tuple[torch.device, DPRandomness | None, int]:
    """Check the request, pick the device, seed torch and put the model in training mode there."""
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
    return device, randomness, seed


@dataclass
class _Loop:
    """What the loop steps: the module it calls, its optimizer and batches (all DP-wrapped under a budget)."""

    trained: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any
    private: PrivateTraining | None


def _build_loop(model: nn.Module, data: TrainingData, cfg: Config, lr: float, trainable: tuple[str, ...],
                optimizer_state: dict | None, budget: SiteBudget | None, randomness: DPRandomness | None,
                seed: int) -> _Loop:
    tc = cfg.train
    dataset = TensorDataset(*data.tensors())
    optimizer = torch.optim.AdamW(select_trainable(model, trainable), lr=lr, weight_decay=tc.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the schedule below restarts from the configured base rate
            group["lr"] = lr
            group.pop("initial_lr", None)
    if budget is None:
        loader = DataLoader(dataset, batch_size=min(tc.batch_size, len(data)), shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        return _Loop(model, optimizer, loader, None)
    private = make_private(model, optimizer, dataset, tc.batch_size, budget, cfg.privacy,
                           cfg.midt.noise_multiplicity, randomness)
    return _Loop(private.module, private.optimizer, private.loader, private)


def _scheduler(optimizer: torch.optim.Optimizer, tc: Any, schedule: bool, steps: int, start_step: int):
    if not schedule or (tc.warmup_steps <= 0 and tc.lr_decay == "none"):
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: lr_factor(n + start_step, steps, tc.warmup_steps, tc.lr_decay))


def _advance(scheduler) -> None:
    if scheduler is not None:
        scheduler.step()


def _losses(diffusion: GaussianDiffusion, trained: nn.Module, x0: torch.Tensor, labels: torch.Tensor,
            demographics: torch.Tensor, rhythm: torch.Tensor | None, cfg: Config,
            mel_loss: MelSpectrogramLoss | None) -> dict[str, torch.Tensor]:
    return diffusion.training_losses(
        trained,
        x0,
        labels,
        demographics,
        mel_loss=mel_loss,
        mel_weight=cfg.midt.weight if mel_loss is not None else 0.0,
        mel_target=cfg.midt.target,
        cond_dropout=cfg.model.cond_dropout,
        noise_multiplicity=cfg.midt.noise_multiplicity,
        rhythm=rhythm,
    )


def _backward(loop: _Loop, per_sample: torch.Tensor, share: float) -> None:
    """Gradients of one pass: per example under DP, else `share` (pass size / batch size) of the pass mean."""
    if loop.private is not None:
        loop.private.backward(per_sample)
    else:
        (per_sample.mean() * share).backward()


def _accumulate(loop: _Loop) -> None:
    """Between the passes of one batch: Opacus clips this pass into its running sum and skips the step."""
    if loop.private is None:
        return  # .grad keeps adding up
    loop.optimizer.signal_skip_step(do_skip=True)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)  # per-sample gradients go; the clipped sum stays


def _step(loop: _Loop, grad_clip: float, scheduler) -> None:
    """The batch's optimizer step (under DP: clip the last pass, noise the sum, account), then the schedule."""
    if loop.private is None and grad_clip > 0:
        nn.utils.clip_grad_norm_(loop.optimizer.param_groups[0]["params"], grad_clip)
    loop.optimizer.step()
    _advance(scheduler)


def _proximal_step(model: nn.Module, anchor: dict[str, torch.Tensor] | None, rate: float) -> None:
    """FedProx as a decoupled proximal step: data-independent, so it costs no privacy."""
    if anchor is None:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.sub_(rate * (p - anchor[name]))


def _zeros() -> dict[str, float]:
    return {"loss": 0.0, "eps": 0.0, "mel": 0.0}


@dataclass
class _Meter:
    """Running loss sums: totals for the TrainResult, a window for each log row."""

    start: float = field(default_factory=time.perf_counter)
    totals: dict[str, float] = field(default_factory=_zeros)
    window: dict[str, float] = field(default_factory=_zeros)
    window_steps: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    examples: int = 0
    empty_batches: int = 0

    def add(self, per_sample: torch.Tensor, losses: dict[str, torch.Tensor], step: int, description: str) -> dict[str, float]:
        batch = {
            "loss": float(per_sample.detach().mean()),
            "eps": float(losses["eps"].detach().float().mean()),
            "mel": float(losses["mel"].detach().float().mean()),
        }
        if not math.isfinite(batch["loss"]):
            raise FloatingPointError(f"{description}: loss became {batch['loss']} at step {step}")
        for key, value in batch.items():
            self.totals[key] += value
            self.window[key] += value
        self.window_steps += 1
        return batch

    def log_row(self, step: int) -> dict[str, float]:
        n = max(1, self.window_steps)
        row = {
            "step": float(step),
            "loss": self.window["loss"] / n,
            "eps_loss": self.window["eps"] / n,
            "mel_loss": self.window["mel"] / n,
            "seconds": time.perf_counter() - self.start,
        }
        self.log.append(row)
        self.window, self.window_steps = _zeros(), 0
        return row

    def result(self, steps: int, taken: int) -> TrainResult:
        return TrainResult(
            steps=steps,
            examples=self.examples,
            loss=self.totals["loss"] / taken,
            eps_loss=self.totals["eps"] / taken,
            mel_loss=self.totals["mel"] / taken,
            seconds=time.perf_counter() - self.start,
            log=self.log,
            empty_batches=self.empty_batches,
        )
