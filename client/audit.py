"""A site's part of the one-run privacy audit (`fedecg privacy audit`): plant canaries, then score them.

The candidates of the site's canary slots are public (common/evaluation/canaries.py). The coins that
choose which candidate of each slot joins the site's training records are drawn from OS entropy at the
site, stored in its state directory under the run key, and never sent. Every slot adds exactly one
record, so the declared N, the sample rate and the noise are the same whatever the coins say.

After the last round the site scores its candidates under the final weights against the run's initial
weights and returns only a summary: per planned guess fraction, how many slots it guessed and how many
it got right, and the attack's AUC and TPR at low FPR. Those are functions of the DP-trained weights, the
public candidates and the audit's own coins: no patient record enters them.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import numpy as np
import torch

from common.config import Config
from common.data.dataset import load_dataset
from common.data.metadata import load_metadata
from common.data.partition import make_partition
from common.diffusion import GaussianDiffusion
from common.evaluation.canaries import (
    CanarySet,
    build_canaries,
    draw_coins,
    score_canaries,
)
from common.evaluation.memorization import attack_metrics
from common.model.denoiser import build_denoiser
from common.normalization import federated_normalizer
from common.privacy.audit import guess_counts
from common.train import TrainingData

RUN_KEY = re.compile(r"[0-9a-f]{32}")


def coins_for_run(cfg: Config, state_dir: Path, run_key: str) -> np.ndarray:
    """The site's secret coins for this run: drawn once, then read back every round (and after a restart)."""
    if not RUN_KEY.fullmatch(run_key):
        raise ValueError(f"run key {run_key!r} is not 32 hex digits; refusing to use it as a file name")
    path = state_dir / "audit" / f"{run_key}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps({"pairs": cfg.audit.pairs_per_site, "entropy": secrets.randbits(128)}))
        partial.replace(path)
    saved = json.loads(path.read_text())
    if saved["pairs"] != cfg.audit.pairs_per_site:
        raise ValueError(f"{path}: drawn for {saved['pairs']} canary slots, the config plans {cfg.audit.pairs_per_site}")
    return draw_coins(saved["pairs"], int(saved["entropy"]))


def site_canaries(cfg: Config, site_index: int, length: int) -> CanarySet:
    """This site's public candidates ([8, length] each); relabelled ones come from a disjoint block of the
    public pool, so no two sites plant the same record."""
    ac = cfg.audit
    relabelled = sum(ac.kinds[i % len(ac.kinds)] == "relabelled" for i in range(ac.pairs_per_site))
    pool = None
    if relabelled:
        partition = make_partition(load_metadata(cfg.data), cfg.partition)
        pool_ids = np.array(sorted(set(partition.public_ids) | set(partition.val_ids)), dtype=np.int64)
        np.random.default_rng(ac.seed).shuffle(pool_ids)
        need = 2 * relabelled
        block = pool_ids[site_index * need:(site_index + 1) * need]
        if len(block) < need:
            raise ValueError(f"relabelled canaries: site {site_index} needs public records {site_index * need}-"
                             f"{(site_index + 1) * need - 1} of a pool (public sites' training and the validation "
                             f"folds) of {len(pool_ids)}; plant fewer slots or audit.kinds: [ood]")
        records = load_dataset(cfg.data, ecg_ids=sorted(int(i) for i in block), progress=False)
        pool = federated_normalizer().normalize(records.signals).astype(np.float32)
    return build_canaries(ac.pairs_per_site, ac.kinds, seed=ac.seed * 1_000_003 + site_index, leads=8,
                          length=length, rate_hz=float(cfg.data.sampling_rate), public_pool=pool)


def with_canaries(data: TrainingData, canaries: CanarySet, coins: np.ndarray) -> TrainingData:
    """The site's training tensors plus the candidate each coin selects (one record per slot)."""
    signals, labels, demographics = canaries.chosen(coins)
    return TrainingData(signals=torch.cat([data.signals, signals]), labels=torch.cat([data.labels, labels]),
                        demographics=torch.cat([data.demographics, demographics]))


def audit_summary(cfg: Config, final_state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                  canaries: CanarySet, coins: np.ndarray) -> dict[str, float]:
    """What leaves the site: slots, (guesses, correct) per planned fraction, AUC and TPR at low FPR."""
    ac = cfg.audit
    model, reference = build_denoiser(cfg.model), build_denoiser(cfg.model)
    model.load_state_dict(final_state)
    reference.load_state_dict(initial)
    scores = score_canaries(model, reference, GaussianDiffusion(cfg.diffusion), canaries, timesteps=ac.timesteps,
                            noise_draws=ac.noise_draws, seed=ac.seed)
    out: dict[str, float] = {"audit-slots": float(len(canaries))}
    for j, (guesses, correct) in enumerate(guess_counts(scores.slot, coins, ac.guess_fractions)):
        out[f"audit-guesses-{j}"] = float(guesses)
        out[f"audit-correct-{j}"] = float(correct)
    members, held_out = scores.member_scores(coins)
    attack = attack_metrics(members, held_out)
    out.update({f"audit-{k}": v for k, v in attack.items() if k.startswith(("mia_auc", "mia_tpr"))})
    return out
