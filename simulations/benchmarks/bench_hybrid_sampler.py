"""One sampler, two denoisers: the high-noise steps from one checkpoint, the low-noise steps from another.

    python -m simulations.benchmarks.bench_hybrid_sampler --low models/ptbxl-site0-unet \\
        --high RUN/checkpoints/final --switch 100 --records 64 --out DIR

`bench_denoise_by_t` shows an eps model denoising best where the noise is small and a model trained for x0 at
high noise (v-prediction, zero terminal SNR) placing the record's layout best where it is large. This
samples with the low checkpoint's schedule and sampler (or DDIM with --steps and --eta, one row per
combination); at its timesteps >= --switch the high checkpoint answers instead (at its own timestep of the
nearest abar, its x0 estimate turned into the low model's eps: `common.expert.SwitchedDenoiser`, which a
config's `diffusion.expert` uses for every sample).
The samples, conditioned like held-out validation records, are scored as `bench_quality_curve` scores a
snapshot, next to the low and the high checkpoint alone, and drawn as one ECG grid per sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from common.bundle import load_generator
    from common.config import load
    from common.expert import SwitchedDenoiser
    from common.generate import generate
    from common.plotting import plot_ecg_grid
    from simulations.benchmarks.bench_quality_curve import _held_out, score_generator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low", type=Path, required=True, help="eps checkpoint, run or bundle: the low-noise steps")
    parser.add_argument("--high", type=Path, required=True, help="checkpoint, run or bundle: the high-noise steps")
    parser.add_argument("--switch", type=int, nargs="+", default=[100], help="first timestep (low schedule) of --high")
    parser.add_argument("--config", default="configs/quality_cpu.yaml", help="its validation folds condition the samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--eta", type=float, nargs="+", default=None,
                        help="DDIM eta of the switched samplers, one row each (default: the low checkpoint's)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="DDIM steps of the switched samplers, one row each (default: the low checkpoint's)")
    parser.add_argument("--switched-only", action="store_true", help="leave out the rows of each checkpoint alone")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = load(args.config, args.overrides)
    real, floor = _held_out(cfg, args.records)
    low, high = load_generator(args.low), load_generator(args.high)
    if low.cfg.diffusion.prediction != "eps":
        parser.error(f"--low must be an eps model, got prediction {low.cfg.diffusion.prediction!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    low = dataclasses.replace(low, expert=None)  # the switch below is this benchmark's, not a configured expert
    samplers = {} if args.switched_only else {"low alone": low, "high alone": high}
    for switch, steps, eta in itertools.product(args.switch, args.steps or [low.cfg.diffusion.sample_steps],
                                                args.eta or [low.cfg.diffusion.eta]):
        cfg = dataclasses.replace(low.cfg, diffusion=dataclasses.replace(low.cfg.diffusion, eta=eta, sample_steps=steps))
        model = SwitchedDenoiser(low.model, low.diffusion, high.model, high.diffusion, switch).eval()
        # A rhythm-conditioned high checkpoint follows beat times from its own table.
        samplers[f"switch at t={switch}, DDIM {steps} eta {eta:g}"] = dataclasses.replace(
            low, model=model, cfg=cfg, rhythm=high.rhythm_table())
    rows = []
    for name, gen in samplers.items():
        row = {"sampler": name, **score_generator(gen, real, floor)}
        rows.append(row)
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        picked = slice(0, 4)
        x12 = generate(gen, real.labels[picked], real.demographics[picked], real.demographics_mask[picked], seed=1,
                       progress=False)
        stem = name.replace(", ", "-").replace(" ", "-").replace("=", "")
        plot_ecg_grid(x12, args.out / f"{stem}.png", titles=[name] * 4)
    (args.out / "hybrid.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
