"""At which noise level does a generator decide the rhythm? Sampling back from noised real records (SDEdit).

    python -m simulations.benchmarks.bench_rhythm_onset --bundle runs/quickstart-bundle \\
        --start 180 160 140 120 100 80 --records 64 --out DIR

Held-out validation records (fold 9) are diffused to each start step and sampled back to x0 by the
generator's own sampler (its public expert included), conditioned like them. Each row says how much of the
real rhythm survives: the share of records in a regular rhythm (`common.evaluation.clinical.regular_rhythm`),
median SDNN, plausible beats and median heart rate, next to the real records and to the generator from pure
noise. Where the regular share falls from the real level to the generator's own, the generator decides the
rhythm itself: the noise range a better model has to get right. Writes rhythm_onset.json and
rhythm_onset.png: the first record's 12 leads, real, from pure noise and from each start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def rhythm_row(name: str, x12: np.ndarray) -> dict[str, float | str]:
    """Rhythm measures of one set of 12-lead records (lead II)."""
    from common.evaluation.clinical import FEATURES, features_table

    table, summary = features_table(x12)
    return {
        "start": name,
        "regular_rhythm_fraction": summary["regular_rhythm_fraction"],
        "median_sdnn_ms": float(np.nanmedian(table[:, FEATURES.index("sdnn_ms")])),
        "median_hr_bpm": float(np.nanmedian(table[:, FEATURES.index("heart_rate_bpm")])),
        "plausible_beat_fraction": summary["plausible_beat_fraction"],
    }


def main(argv: list[str] | None = None) -> int:
    from common.bundle import load_generator
    from common.config import load
    from common.generate import generate
    from common.plotting import plot_ecg_grid
    from simulations.benchmarks.bench_quality_curve import _held_out

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="release bundle, checkpoint or run directory")
    parser.add_argument("--start", type=int, nargs="+", default=[180, 160, 140, 120, 100, 80],
                        help="timesteps to start from (the sampler's first step at or below each)")
    parser.add_argument("--config", default="configs/quality_cpu.yaml", help="its validation folds condition the samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gen = load_generator(args.bundle)
    last = gen.diffusion.num_timesteps - 1
    if any(not 0 <= s <= last for s in args.start):  # before any sampling, not after the pure-noise row
        parser.error(f"--start steps must lie in 0..{last}, got {args.start}")
    real, _ = _held_out(load(args.config, args.overrides), args.records)
    args.out.mkdir(parents=True, exist_ok=True)
    conditions = (real.labels, real.demographics, real.demographics_mask)
    sets = {"real": real.signals12(), "pure noise": generate(gen, *conditions, seed=0, progress=False)}
    for step in sorted(args.start, reverse=True):
        sets[f"t={step}"] = generate(gen, *conditions, seed=0, progress=False, start_from=(real.signals, step))
    rows = [rhythm_row(name, x12) for name, x12 in sets.items()]
    print(f"{'start':>11} {'regular':>8} {'SDNN ms':>8} {'HR bpm':>7} {'plausible':>9}")
    for r in rows:
        print(f"{r['start']:>11} {r['regular_rhythm_fraction']:8.3f} {r['median_sdnn_ms']:8.1f} "
              f"{r['median_hr_bpm']:7.1f} {r['plausible_beat_fraction']:9.3f}")
    (args.out / "rhythm_onset.json").write_text(json.dumps(
        {"bundle": str(args.bundle), "records": len(real), "rows": rows}, indent=2) + "\n")
    plot_ecg_grid(np.stack([x12[0] for x12 in sets.values()]), args.out / "rhythm_onset.png",
                  titles=[f"{name} (first validation record's conditions)" for name in sets], max_records=len(sets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
