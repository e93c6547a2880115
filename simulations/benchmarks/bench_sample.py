"""Sampling speed: records per second of 12-lead ECGs from a generator, through common.generate.

    python -m simulations.benchmarks.bench_sample --bundle runs/quickstart-bundle          # the demo's sampler
    python -m simulations.benchmarks.bench_sample --bundle B --steps 10,25 --batch 32,64,128
    python -m simulations.benchmarks.bench_sample --config configs/unet_gpu.yaml           # untrained weights

Speed does not depend on the weights' values, so `--config` (random weights) measures a preset with no bundle.
Prints records/s per (sampler steps, batch size) after one warm-up batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def _generator(args: argparse.Namespace):
    from common.bundle import build_generator, load_generator
    from common.config import load
    from common.model.denoiser import build_denoiser
    from common.normalization import federated_normalizer

    if args.bundle:
        return load_generator(args.bundle)
    cfg = load(args.config, args.overrides)
    torch.manual_seed(0)
    return build_generator(cfg, build_denoiser(cfg.model).state_dict(), federated_normalizer(), Path(args.config))


def main(argv: list[str] | None = None) -> int:
    from common.generate import generate
    from common.model.denoiser import count_parameters

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="release bundle, checkpoint or run directory")
    source.add_argument("--config", help="YAML config: its model with untrained weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--steps", default="", help="comma-separated sampler steps (default: the generator's)")
    parser.add_argument("--batch", default="64", help="comma-separated batch sizes")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    gen = _generator(args)
    labels = np.zeros((args.records, 71), dtype=np.float32)
    labels[:, 0] = 1.0
    demographics = np.zeros((args.records, 4), dtype=np.float32)
    mask = np.zeros((args.records, 4), dtype=np.float32)
    steps_list = [int(s) for s in args.steps.split(",")] if args.steps else [gen.cfg.diffusion.sample_steps]
    print(f"model '{gen.cfg.model.size}', {count_parameters(gen.model):,} parameters, sampler {gen.cfg.diffusion.sampler}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'steps':>6} {'batch':>6} {'records/s':>10} {'s/record':>9}")
    for steps in steps_list:
        for batch in (int(b) for b in args.batch.split(",")):
            generate(gen, labels[:batch], demographics[:batch], mask[:batch], steps=steps, batch_size=batch,
                     progress=False, device=args.device)  # warm-up
            start = time.perf_counter()
            generate(gen, labels, demographics, mask, steps=steps, batch_size=batch, progress=False, device=args.device)
            seconds = time.perf_counter() - start
            print(f"{steps:6d} {batch:6d} {args.records / seconds:10.2f} {seconds / args.records:9.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
