"""The shared 1-D CNN of the evaluation: a small xresnet1d-style residual network for 12-lead ECGs.

One architecture serves three purposes:
- the reference classifier (real training data -> SCP statements) whose pooled features span the
  Frechet-distance space and whose test score is TRTR;
- TSTR and the low-data experiments (trained on synthetic or mixed data);
- the demographic predictors (age regressor, sex classifier).

Training is deterministic under `ClassifierConfig.seed` on CPU: the same arrays and config give the same
weights. `train_or_load` caches trained weights keyed by content (sha256 of the training arrays, the task
and every hyperparameter), so the reference classifier is trained once per data set. Weights are stored
as safetensors with the config in the file's metadata; nothing is pickled.

Inputs are float arrays [N, leads, T] in mV. Inside the network each lead is divided by `input_scale`
(1 mV) and clipped to +-`input_clip` so that one broken record cannot dominate a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

Task = Literal["multilabel", "binary", "regression"]
TASKS = ("multilabel", "binary", "regression")
_CACHE_FORMAT = 1  # bump when the architecture or training loop changes meaning of cached weights


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (32, 64, 128)  # channels per stage; each stage halves the length
    blocks_per_stage: int = 1
    kernel_size: int = 5
    dropout: float = 0.25
    epochs: int = 10
    min_steps: int = 0  # at least this many optimizer steps: small sets get more epochs, not fewer updates
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    input_scale: float = 1.0  # mV
    input_clip: float = 10.0  # in units of input_scale

    def __post_init__(self) -> None:
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"ClassifierConfig.widths must be positive channel counts, got {self.widths}")
        for name in ("blocks_per_stage", "kernel_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_steps < 0:
            raise ValueError(f"ClassifierConfig.min_steps must be >= 0, got {self.min_steps}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ClassifierConfig.kernel_size must be odd, got {self.kernel_size}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        raw = json.loads(text)
        raw["widths"] = tuple(raw["widths"])
        return cls(**raw)


class ResBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus a ResNet-D shortcut (average pool, then 1x1 conv) when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (xresnet's zero-init)
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(nn.AvgPool1d(stride, stride, ceil_mode=True))
        if in_channels != out_channels:
            shortcut += [nn.Conv1d(in_channels, out_channels, 1, bias=False), nn.BatchNorm1d(out_channels)]
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (B C L')
        h = self.bn2(self.conv2(h))  # (B C L')
        return F.relu(h + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem (3 convs, stride 2, max-pool) -> residual stages -> concat(avg, max) pooling -> linear head."""

    def __init__(self, in_leads: int, num_outputs: int, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_leads = in_leads
        self.num_outputs = num_outputs
        k, w0 = cfg.kernel_size, cfg.widths[0]
        self.stem = nn.Sequential(
            nn.Conv1d(in_leads, w0, k, 2, k // 2, bias=False), nn.BatchNorm1d(w0), nn.ReLU(),
            nn.Conv1d(w0, w0, k, 1, k // 2, bias=False), nn.BatchNorm1d(w0), nn.ReLU(),
            nn.MaxPool1d(3, 2, 1),
        )
        stages: list[nn.Module] = []
        channels = w0
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.blocks_per_stage):
                stride = 2 if (j == 0 and i > 0) else 1
                stages.append(ResBlock1d(channels, width, stride, k))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.feature_dim = 2 * channels
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.feature_dim, num_outputs))
        # Regression targets are standardized for training; predictions are mapped back with these.
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_std", torch.ones(num_outputs))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.input_clip
        return torch.clamp(x / self.cfg.input_scale, -clip, clip)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [B, feature_dim] (the Frechet-distance space)."""
        h = self.stages(self.stem(self._prepare(x)))  # (B C L')
        return torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1)  # (B 2C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B num_outputs) logits or standardized values


def _check_xy(x: np.ndarray, y: np.ndarray, task: Task) -> tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(f"classifier task must be one of {TASKS}, got {task!r}")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"classifier inputs must be [N, leads, T], got shape {x.shape}")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"classifier targets must be [N, outputs] with N={x.shape[0]}, got shape {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 training records for the classifier, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("classifier inputs contain NaN or inf")
    if not np.isfinite(y).all():
        raise ValueError("classifier targets contain NaN or inf: drop records with missing targets first")
    if task in ("multilabel", "binary") and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{task} targets must be 0/1")
    return x, y


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    task: Task = "multilabel",
    cfg: ClassifierConfig | None = None,
    progress: bool = True,
    desc: str = "classifier",
) -> ResNet1d:
    """Train a ResNet1d on arrays x [N, leads, T] (mV), y [N, outputs]; returns it in eval mode.

    multilabel/binary: BCE with logits; regression: smooth L1 on standardized targets. AdamW with a
    one-cycle learning-rate schedule over max(epochs, enough epochs for min_steps) epochs. Deterministic
    under cfg.seed (weights and batch order).
    """
    cfg = cfg or ClassifierConfig()
    x, y = _check_xy(x, y, task)
    torch.manual_seed(cfg.seed)
    model = ResNet1d(x.shape[1], y.shape[1], cfg)
    if task == "regression":
        mean, std = y.mean(axis=0), y.std(axis=0)
        model.target_mean.copy_(torch.from_numpy(mean))
        model.target_std.copy_(torch.from_numpy(np.where(std > 0, std, 1.0).astype(np.float32)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if task == "regression":
        yt = (yt - model.target_mean) / model.target_std
    n = xt.shape[0]
    batch_size = min(cfg.batch_size, n)
    full_batches = n // batch_size + (1 if n % batch_size >= 2 else 0)  # a last batch of 1 is skipped
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / full_batches))
    total_steps = epochs * full_batches
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.3)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples; a lone leftover record waits for the next epoch
                continue
            out = model(xt[idx])
            if task == "regression":
                loss = F.smooth_l1_loss(out, yt[idx])
            else:
                loss = F.binary_cross_entropy_with_logits(out, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def predict(model: ResNet1d, x: np.ndarray, task: Task = "multilabel", batch_size: int = 256) -> np.ndarray:
    """Probabilities (multilabel/binary) or values in target units (regression), [N, outputs]."""
    model.eval()
    x = np.asarray(x, dtype=np.float32)
    outs = []
    for start in range(0, x.shape[0], batch_size):
        out = model(torch.from_numpy(x[start : start + batch_size]))
        if task == "regression":
            out = out * model.target_std + model.target_mean
        else:
            out = torch.sigmoid(out)
        outs.append(out.numpy())
    if not outs:
        return np.zeros((0, model.num_outputs), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


@torch.no_grad()
def embed(model: ResNet1d, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled features [N, feature_dim] in float64 (for covariance estimates)."""
    model.eval()
    x = np.asarray(x, dtype=np.float32)
    feats = [model.features(torch.from_numpy(x[s : s + batch_size])).double().numpy() for s in range(0, len(x), batch_size)]
    return np.concatenate(feats) if feats else np.zeros((0, model.feature_dim))


def content_key(x: np.ndarray, y: np.ndarray, task: Task, cfg: ClassifierConfig) -> str:
    """sha256 over the training arrays (bytes, shapes, dtypes), the task and every hyperparameter."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)):
        h.update(str(arr.shape).encode())
        h.update(memoryview(arr).cast("B"))
    h.update(f"task={task};format={_CACHE_FORMAT};cfg={cfg.to_json()}".encode())
    return h.hexdigest()


def save_classifier(model: ResNet1d, path: str | Path, task: Task) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "cfg": model.cfg.to_json(),
        "task": task,
        "in_leads": str(model.in_leads),
        "num_outputs": str(model.num_outputs),
        "format": str(_CACHE_FORMAT),
    }
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path


def load_classifier(path: str | Path) -> tuple[ResNet1d, Task]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = {"cfg", "task", "in_leads", "num_outputs"} - set(meta)
    if missing:
        raise ValueError(f"{path}: not a fedecg classifier file (metadata lacks {sorted(missing)})")
    model = ResNet1d(int(meta["in_leads"]), int(meta["num_outputs"]), ClassifierConfig.from_json(meta["cfg"]))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model, meta["task"]  # type: ignore[return-value]


def train_or_load(
    x: np.ndarray,
    y: np.ndarray,
    task: Task,
    cfg: ClassifierConfig,
    cache_dir: str | Path | None,
    progress: bool = True,
    desc: str = "classifier",
) -> tuple[ResNet1d, bool]:
    """Train, or load the cached weights trained on exactly these arrays and hyperparameters.

    Returns (model, loaded_from_cache). cache_dir None disables caching.
    """
    if cache_dir is None:
        return train_classifier(x, y, task, cfg, progress, desc), False
    key = content_key(x, y, task, cfg)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        model, cached_task = load_classifier(path)
        if cached_task != task:
            raise ValueError(f"{path}: cached task {cached_task!r} does not match {task!r}")
        return model, True
    model = train_classifier(x, y, task, cfg, progress, desc)
    save_classifier(model, path, task)
    return model, False
