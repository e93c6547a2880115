"""Memorization and membership risk of a generator, from distances and from the model's own loss.

Distance space. Records are the model's 8 leads, normalized with the generator's Normalizer (the space
the model was trained in), average-pooled by `POOL` = 4 in time (1000 -> 250 samples: below 12.5 Hz of
each lead is kept, enough to tell a copy from a look-alike, and 4x cheaper), flattened to 2,000 values and
standardized per record (zero mean, unit RMS). The distance is the Euclidean distance divided by
sqrt(2000): d = sqrt(2 - 2 r) with r the Pearson correlation of the two flattened records, 0 for a copy
(also a rescaled one). Without the per-record standardization, low-amplitude records are everybody's
nearest neighbour (hubs), and on the real PTB-XL subset the share below swung from 0.19 to 0.65 depending
only on which real fold served as holdout; with it, it stays within sampling noise of 0.5.
Nearest neighbours come from torch.cdist in chunks.

Metrics (`distance_metrics`):
- DCR: each synthetic record's distance to its closest training record. To compare like with like, the
  training reference is a random subset of the same size as the holdout (records the generator never saw).
  `dcr_share_closer_to_train`: share of synthetic records strictly closer to that training subset than to
  the holdout (ties count half). About 0.5 when the generator does not favour its training records
  (the idea of SDMetrics' DCROverfittingProtection); towards 1 means memorization.
- NNDR: closest / second-closest training distance (full training set); copies give values near 0.
- Near-copy rate: share of synthetic records whose DCR to the full training set is below a threshold
  calibrated on real data: the `NEAR_COPY_QUANTILE` (1 %) quantile of holdout-to-train nearest-neighbour
  distances. By construction about 1 % of unseen real records would count as near copies; the synthetic
  rate should not exceed that.

Membership inference (`membership_inference`): the loss attack. For each record, the denoiser's
eps-prediction MSE averaged over fixed timesteps (evenly spaced over the schedule) and fixed noises (seeded
per record position, identical for members and non-members), score = -loss. AUC and TPR at 1 % FPR
(sklearn roc_curve, interpolated at FPR = 0.01) of members (training records) against non-members
(holdout). 0.5 / 0.01 is chance.

`site_memorization_metrics` returns only aggregate floats, so a federated site can run it on its own data
and release the numbers alone.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.nn import functional as F
from tqdm.auto import tqdm

POOL = 4
NEAR_COPY_QUANTILE = 0.01
CHUNK = 512


class _NormalizerLike(Protocol):
    def normalize(self, x: Any) -> Any: ...


def distance_features(x8_normalized: np.ndarray | torch.Tensor, pool: int = POOL) -> torch.Tensor:
    """[N, 8, T] normalized signals -> [N, 8 * T / pool] float32 features: pooled in time, unit RMS per record."""
    x = torch.as_tensor(np.asarray(x8_normalized), dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"signals must be [N, leads, T], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("signals contain NaN or inf")
    if pool > 1:
        x = F.avg_pool1d(x, pool, pool)  # (N L T/pool)
    flat = x.reshape(x.shape[0], -1)  # (N D)
    flat = flat - flat.mean(dim=1, keepdim=True)
    rms = flat.pow(2).mean(dim=1, keepdim=True).sqrt()  # (N 1)
    return (flat / torch.where(rms > 1e-8, rms, torch.ones_like(rms))).contiguous()


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, k: int = 1, chunk: int = CHUNK) -> torch.Tensor:
    """Distances [Nq, k] (ascending) from each query to its k nearest reference rows (RMS units)."""
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise ValueError(f"feature matrices must be [N, D] with equal D, got {tuple(queries.shape)} and {tuple(reference.shape)}")
    if reference.shape[0] < k:
        raise ValueError(f"need at least {k} reference records, got {reference.shape[0]}")
    scale = 1.0 / math.sqrt(queries.shape[1])
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].double()
        best = None
        for rstart in range(0, reference.shape[0], chunk):
            d = torch.cdist(q, reference[rstart : rstart + chunk].double())  # (q r)
            best = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(best, min(k, best.shape[1]), dim=1, largest=False).values
        out.append(best * scale)
    return torch.cat(out).float() if out else torch.zeros(0, k)


def distance_metrics(
    synthetic: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor,
    seed: int = 0,
    distances: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """DCR share, NNDR and near-copy rate from feature matrices (see the module docstring).

    Pass a dict as `distances` to receive the underlying nearest-neighbour distances (for plots):
    synthetic_to_train_subset, synthetic_to_holdout, synthetic_to_train, holdout_to_train.
    """
    for name, t in (("synthetic", synthetic), ("train", train), ("holdout", holdout)):
        if t.ndim != 2 or t.shape[0] == 0:
            raise ValueError(f"{name} features must be a non-empty [N, D] matrix, got {tuple(t.shape)}")
    if train.shape[0] < 2:
        raise ValueError(f"need at least 2 training records for NNDR, got {train.shape[0]}")
    n_ref = min(train.shape[0], holdout.shape[0])
    rng = np.random.default_rng(seed)
    train_sub = train[torch.from_numpy(rng.choice(train.shape[0], n_ref, replace=False))]
    hold_sub = holdout[torch.from_numpy(rng.choice(holdout.shape[0], n_ref, replace=False))]
    d_train_sub = nearest_distances(synthetic, train_sub)[:, 0]
    d_hold = nearest_distances(synthetic, hold_sub)[:, 0]
    share = float(((d_train_sub < d_hold).float() + 0.5 * (d_train_sub == d_hold).float()).mean())
    d_train2 = nearest_distances(synthetic, train, k=2)  # (N 2)
    dcr = d_train2[:, 0]
    nndr = d_train2[:, 0] / torch.clamp(d_train2[:, 1], min=1e-12)
    hold_to_train = nearest_distances(holdout, train)[:, 0]
    threshold = float(torch.quantile(hold_to_train.double(), NEAR_COPY_QUANTILE))
    if distances is not None:
        distances.update({
            "synthetic_to_train_subset": d_train_sub.numpy(),
            "synthetic_to_holdout": d_hold.numpy(),
            "synthetic_to_train": dcr.numpy(),
            "holdout_to_train": hold_to_train.numpy(),
        })
    return {
        "dcr_share_closer_to_train": share,
        "dcr_train_median": float(dcr.median()),
        "dcr_holdout_median": float(d_hold.median()),
        "dcr_train_subset_median": float(d_train_sub.median()),
        "nndr_median": float(nndr.median()),
        "nndr_min": float(nndr.min()),
        "near_copy_threshold": threshold,
        "near_copy_rate": float((dcr < threshold).float().mean()),
        "holdout_to_train_median": float(hold_to_train.median()),
        "n_synthetic": float(synthetic.shape[0]),
        "n_reference": float(n_ref),
    }


@torch.no_grad()
def diffusion_losses(
    model: torch.nn.Module,
    diffusion: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    demographics: torch.Tensor,
    timesteps: list[int] | tuple[int, ...],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    noise_draws: int = 1,
) -> np.ndarray:
    """Per-record eps-MSE averaged over `timesteps` x `noise_draws` fixed noises: [N] float64.

    x0: normalized signals [N, 8, T]; labels, demographics: the model's conditioning tensors.
    Record i at timestep t, draw d always gets the same noise (seeded by (seed, t, d, i)), so two sets of
    records are scored under identical randomness. More draws average out the noise's own variance, which
    at one draw hides most of the member/non-member gap.
    """
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
    if x0.ndim != 3 or labels.shape[0] != x0.shape[0] or demographics.shape[0] != x0.shape[0]:
        raise ValueError(
            f"x0 [N, leads, T], labels [N, K] and demographics [N, D] must agree in N: got {tuple(x0.shape)}, "
            f"{tuple(labels.shape)}, {tuple(demographics.shape)}"
        )
    num_timesteps = int(getattr(diffusion, "num_timesteps", 0) or getattr(getattr(diffusion, "cfg", None), "timesteps", 0))
    for t in timesteps:
        if num_timesteps and not 0 <= t < num_timesteps:
            raise ValueError(f"timestep {t} outside the diffusion schedule [0, {num_timesteps})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = np.zeros(x0.shape[0], dtype=np.float64)
    draws = [(int(t), d) for t in timesteps for d in range(noise_draws)]
    bar = tqdm(total=len(draws) * math.ceil(x0.shape[0] / batch_size), desc="membership losses",
               disable=not progress, leave=False)
    for t, draw in draws:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t + 100_003 * draw)
        noise_all = torch.randn(x0.shape, generator=gen)  # position-indexed: identical across sets
        for start in range(0, x0.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            xb = x0[sl].to(device)
            nb = noise_all[sl].to(device)
            tb = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=device)
            xt = diffusion.q_sample(xb, tb, nb)
            eps = model(xt, tb, labels[sl].to(device), demographics[sl].to(device))
            total[sl] += ((eps - nb) ** 2).mean(dim=tuple(range(1, eps.ndim))).double().cpu().numpy()
            bar.update(1)
    bar.close()
    model.train(was_training)
    return total / len(draws)


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 0.1 % and 1 % FPR of 'higher score = member'.

    The TPR at an FPR below 1 / (non-members) is read off the ROC's first step and is as coarse as that.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError(f"membership attack needs members and non-members, got {m.size} and {n.size}")
    y = np.concatenate([np.ones(m.size), np.zeros(n.size)])
    s = np.concatenate([m, n])
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "mia_auc": float(roc_auc_score(y, s)),
        "mia_tpr_at_0p1pct_fpr": float(np.interp(0.001, fpr, tpr)),
        "mia_tpr_at_1pct_fpr": float(np.interp(0.01, fpr, tpr)),
        "mia_n_members": float(m.size),
        "mia_n_nonmembers": float(n.size),
    }


def roc_points(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of 'higher score = member', for the ROC plot."""
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    fpr, tpr, _ = roc_curve(y, np.concatenate([member_scores, nonmember_scores]))
    return fpr, tpr


def default_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spread over (0, num_timesteps), avoiding both ends."""
    if count < 1 or num_timesteps < 1:
        raise ValueError(f"need count >= 1 and num_timesteps >= 1, got {count}, {num_timesteps}")
    return sorted({int(round((i + 0.5) * num_timesteps / count)) for i in range(count)} - {num_timesteps})


def membership_inference(
    model: torch.nn.Module,
    diffusion: Any,
    members: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    timesteps: list[int] | tuple[int, ...],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """Loss attack; members/nonmembers are (x0 normalized [N,8,T], labels, demographics) tensors."""
    lm = diffusion_losses(model, diffusion, *members, timesteps=timesteps, seed=seed, batch_size=batch_size, progress=progress)
    ln = diffusion_losses(model, diffusion, *nonmembers, timesteps=timesteps, seed=seed, batch_size=batch_size, progress=progress)
    out = attack_metrics(-lm, -ln)
    out["mia_loss_members_mean"] = float(lm.mean())
    out["mia_loss_nonmembers_mean"] = float(ln.mean())
    return out


def _conditioning(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's conditioning tensors for an ECGDataset: (labels [N,71], encoded demographics)."""
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.float32)
    demo = torch.as_tensor(np.asarray(dataset.encoded_demographics()), dtype=torch.float32)
    return labels, demo


def site_memorization_metrics(
    model: torch.nn.Module,
    diffusion: Any,
    normalizer: _NormalizerLike,
    train: Any,
    holdout: Any,
    synthetic8_mV: np.ndarray,
    max_records: int = 256,
    mia_timesteps: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """Aggregate memorization metrics of one site's data; returns only scalars (safe to release).

    train / holdout: ECGDataset (records the model trained on / never saw); synthetic8_mV: [N, 8, T]
    synthetic records in mV from the same model. At most `max_records` records of each real set are used
    (random under `seed`) for the membership attack; distances use all records.
    """
    synthetic8_mV = np.asarray(synthetic8_mV, dtype=np.float32)
    if synthetic8_mV.ndim != 3 or synthetic8_mV.shape[1:] != np.asarray(train.signals).shape[1:]:
        raise ValueError(
            f"synthetic8_mV must be [N, 8, T] like the training signals {np.asarray(train.signals).shape[1:]}, "
            f"got {synthetic8_mV.shape}"
        )
    if len(train.signals) < 2 or len(holdout.signals) < 1:
        raise ValueError(f"need >= 2 training and >= 1 holdout records, got {len(train.signals)} and {len(holdout.signals)}")

    def norm(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(normalizer.normalize(np.asarray(x, dtype=np.float32))), dtype=torch.float32)

    out = distance_metrics(
        distance_features(norm(synthetic8_mV)), distance_features(norm(train.signals)), distance_features(norm(holdout.signals)), seed=seed
    )
    rng = np.random.default_rng(seed)
    n = min(max_records, len(train.signals), len(holdout.signals))
    pick_m = np.sort(rng.choice(len(train.signals), n, replace=False))
    pick_n = np.sort(rng.choice(len(holdout.signals), n, replace=False))
    lab_m, demo_m = _conditioning(train)
    lab_n, demo_n = _conditioning(holdout)
    num_t = int(getattr(diffusion, "num_timesteps", 0) or diffusion.cfg.timesteps)
    steps = default_timesteps(num_t, mia_timesteps)
    out.update(
        membership_inference(
            model,
            diffusion,
            (norm(np.asarray(train.signals)[pick_m]), lab_m[pick_m], demo_m[pick_m]),
            (norm(np.asarray(holdout.signals)[pick_n]), lab_n[pick_n], demo_n[pick_n]),
            steps,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    )
    return {k: float(v) for k, v in out.items()}
