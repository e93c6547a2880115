"""Quality against training minutes: public pretraining of each preset for the same time, scored along the way.

    python -m simulations.benchmarks.bench_quality_curve --config configs/quality_cpu.yaml \
        --models unet small --minutes 12 --points 4 --out runs/bench-quality-curve

For every model preset this runs `fedecg pretrain`'s own path (simulations.central.run_central on the config's
public pool, non-private) with as many steps as a short timed calibration says fit in --minutes, its cosine
schedule spanning them and an EMA snapshot every steps/--points. Each snapshot then samples --records ECGs
conditioned like held-out real records (the config's validation folds), scored as `fedecg evaluate` scores
them: plausible-beat fraction, median heart rate and median SDNN (rhythm regularity; lead II delineation)
against the real records, and the inter-lead correlation error against the real-vs-real floor (a second,
disjoint real half of the same size).
Writes curve.csv, curve.json and curve.png (one line per preset) under --out and prints the table.
Minutes are the training loop's wall seconds (metrics.csv), so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

CALIBRATION_STEPS = 6


def _preset_config(cfg, size: str, steps: int, points: int):
    """The config's pretraining recipe for `size`, over `steps`, with `points` evenly spaced EMA snapshots."""
    every = max(1, steps // points)
    train = dataclasses.replace(cfg.train, steps=every * points, sample_every=every, log_every=every,
                                warmup_steps=min(cfg.train.warmup_steps, every * points // 10))
    model = dataclasses.replace(cfg.model, size=size)
    return dataclasses.replace(cfg, model=model, train=train, output=dataclasses.replace(cfg.output, name=size))


def _seconds_per_step(cfg, size: str) -> float:
    """Wall seconds of one pretraining step of `size` (after one warm-up step), on random inputs of the real shape."""
    import torch

    from common.diffusion import GaussianDiffusion
    from common.model.denoiser import build_denoiser
    from common.train import TrainingData, train_local

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, size=size))
    batch = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    data = TrainingData(torch.randn(4 * batch, 8, 1000, generator=g), (torch.rand(4 * batch, 71, generator=g) < 0.05).float(),
                        torch.zeros(4 * batch, 8))
    model = build_denoiser(cfg.model)
    diffusion = GaussianDiffusion(cfg.diffusion)
    train_local(model, diffusion, data, cfg, steps=1, progress=False)
    start = time.perf_counter()
    train_local(model, diffusion, data, cfg, steps=CALIBRATION_STEPS, progress=False)
    return (time.perf_counter() - start) / CALIBRATION_STEPS


def _held_out(cfg, records: int):
    """Two disjoint halves of the validation folds' records: conditions and reference (A), floor (B)."""
    from common.data.dataset import load_dataset
    from common.data.metadata import load_metadata

    meta = load_metadata(cfg.data)
    ids = meta.index[meta["strat_fold"].isin(cfg.partition.val_folds)].to_numpy()
    if ids.size < 2 * records:
        raise ValueError(f"--records {records}: the validation folds hold {ids.size} records, need {2 * records}")
    chosen = np.random.default_rng(0).choice(ids, size=2 * records, replace=False)
    dataset = load_dataset(cfg.data, ecg_ids=chosen, progress=False)
    return dataset.subset(dataset.ecg_ids[:records]), dataset.subset(dataset.ecg_ids[records:])


def score(checkpoint: Path, real, floor, seed: int = 0) -> dict[str, float]:
    """The snapshot's samples, conditioned like `real`, against `real` (and `floor` for the ILCE floor)."""
    from common.bundle import load_generator

    return score_generator(load_generator(checkpoint), real, floor, seed)


def score_generator(gen, real, floor, seed: int = 0) -> dict[str, float]:
    """A generator's samples, conditioned like `real`, against `real` (and `floor` for the ILCE floor)."""
    from common.evaluation.clinical import FEATURES, features_table
    from common.evaluation.fidelity import interlead_correlation_error
    from common.generate import generate

    start = time.perf_counter()
    synthetic = generate(gen, real.labels, real.demographics, real.demographics_mask, seed=seed, progress=False)
    sampling = time.perf_counter() - start
    real12, floor12 = real.signals12(), floor.signals12()
    tables = {name: features_table(x) for name, x in (("synthetic", synthetic), ("real", real12))}

    def median(kind: str, feature: str) -> float:
        return float(np.nanmedian(tables[kind][0][:, FEATURES.index(feature)]))

    hr_syn, hr_real = median("synthetic", "heart_rate_bpm"), median("real", "heart_rate_bpm")
    ilce = interlead_correlation_error(real12, synthetic)["mean"]
    ilce_floor = interlead_correlation_error(real12, floor12)["mean"]
    return {
        "plausible_beat_fraction": tables["synthetic"][1]["plausible_beat_fraction"],
        "plausible_beat_fraction_real": tables["real"][1]["plausible_beat_fraction"],
        "median_hr_bpm": hr_syn,
        "median_hr_real_bpm": hr_real,
        "hr_error_pct": 100.0 * abs(hr_syn / hr_real - 1.0),
        "median_sdnn_ms": median("synthetic", "sdnn_ms"),  # rhythm regularity: beat-to-beat spread
        "median_sdnn_real_ms": median("real", "sdnn_ms"),
        "regular_rhythm_fraction": tables["synthetic"][1]["regular_rhythm_fraction"],
        "regular_rhythm_fraction_real": tables["real"][1]["regular_rhythm_fraction"],
        "ilce": ilce,
        "ilce_ratio": ilce / ilce_floor,
        "sampling_records_per_s": len(real) / sampling,
    }


def _snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint) of the run's EMA snapshots and its final checkpoint, in step order."""
    from common.bundle import read_checkpoint

    return sorted((int(read_checkpoint(d)[3]["step"]), d) for d in (run_dir / "checkpoints").iterdir() if d.is_dir())


def curve(cfg, size: str, minutes: float, points: int, out: Path, real, floor) -> list[dict[str, float | str]]:
    """Pretrain `size` for about `minutes` and score every snapshot; one row per snapshot."""
    from common.model.denoiser import build_denoiser, count_parameters
    from simulations.central import run_central

    per_step = _seconds_per_step(cfg, size)
    steps = max(points, round(minutes * 60.0 / per_step))
    preset = _preset_config(cfg, size, steps, points)
    print(f"{size}: {per_step:.3f} s per step of {cfg.train.batch_size} -> {preset.train.steps} steps in ~{minutes} min")
    run_dir = out / size
    run_central(preset, run_dir, progress=True, pool="public")
    with (run_dir / "metrics.csv").open(newline="") as handle:
        seconds = {int(float(r["step"])): float(r["seconds"]) for r in csv.DictReader(handle)}
    parameters = count_parameters(build_denoiser(preset.model))
    rows = []
    for step, checkpoint in _snapshots(run_dir):
        row = {"model": size, "parameters": parameters, "step": step, "minutes": seconds[step] / 60.0,
               **score(checkpoint, real, floor)}
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from common.config import load
    from common.plotting import plot_curves

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quality_cpu.yaml", help="its public pool and pretraining recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--models", nargs="+", default=["unet", "small"], help="model presets (model.size)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time per preset")
    parser.add_argument("--points", type=int, default=4, help="scored snapshots per preset")
    parser.add_argument("--records", type=int, default=96, help="synthetic records per snapshot")
    parser.add_argument("--out", type=Path, required=True, help="a new directory")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new directory")
    cfg = load(args.config, args.overrides)
    real, floor = _held_out(cfg, args.records)
    rows = [row for size in args.models for row in curve(cfg, size, args.minutes, args.points, args.out, real, floor)]
    with (args.out / "curve.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2))
    plot_curves(rows, "minutes", ["plausible_beat_fraction", "hr_error_pct", "ilce_ratio", "median_sdnn_ms"], args.out / "curve.png",
                "quality against training minutes (public pretraining)", group_key="model")
    print(f"wrote {args.out / 'curve.csv'} and {args.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
