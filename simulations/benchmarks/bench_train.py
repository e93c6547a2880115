"""Local training throughput of one site through THE training loop (common.train), DP against non-DP.

    # quickstart model on CPU, every Opacus grad-sample mode:
    python -m simulations.benchmarks.bench_train --config configs/quickstart.yaml --steps 6 \
        --variants nondp,hooks,functorch,ghost
    # the quality recipe's DP fine-tuning: only federation.trainable is trained, DP and non-DP alike
    python -m simulations.benchmarks.bench_train --config configs/quality_cpu.yaml --steps 6 --trainable
    # GPU slice of the paper-size model (a site's records exported once to a small cache file):
    python -m simulations.benchmarks.bench_train --config configs/ptbxl_sites.yaml --export-cache site0.npz --records 1000
    python -m simulations.benchmarks.bench_train --config configs/ptbxl_sites.yaml --cache site0.npz --steps 20

Each variant runs in its own subprocess so peak GPU memory and Opacus' state are clean. Prints samples/s
(examples actually drawn / wall time, after warm-up steps), seconds per step and peak GPU memory, and the
ratio of each DP variant to non-DP. A variant that fails is reported with its error, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from simulations.benchmarks.isolated import run_isolated


def _site_data(cfg, site_index: int, records: int | None):
    from client.site import load_site
    from common.data.partition import count_sites
    from common.normalization import federated_normalizer
    from common.train import TrainingData

    site = load_site(cfg, {"partition-id": site_index, "num-partitions": count_sites(cfg)})
    data = TrainingData.from_dataset(site.train, federated_normalizer())
    if records:
        data = TrainingData(data.signals[:records], data.labels[:records], data.demographics[:records])
    return data


def export_cache(cfg, path: Path, site_index: int, records: int) -> None:
    """Normalized float16 signals + labels + demographics of one site's first records (no ids, no metadata)."""
    import numpy as np

    data = _site_data(cfg, site_index, records)
    np.savez_compressed(
        path,
        signals=data.signals.numpy().astype(np.float16),
        labels=data.labels.numpy().astype(np.uint8),
        demographics=data.demographics.numpy(),
    )
    print(f"wrote {len(data)} records to {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _load_cache(path: Path):
    import numpy as np
    import torch

    from common.train import TrainingData

    with np.load(path, allow_pickle=False) as z:
        return TrainingData(
            torch.from_numpy(z["signals"].astype(np.float32)),
            torch.from_numpy(z["labels"].astype(np.float32)),
            torch.from_numpy(z["demographics"].astype(np.float32)),
        )


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from common.config import load
    from common.diffusion import GaussianDiffusion
    from common.model.denoiser import build_denoiser, count_parameters
    from common.privacy import plan_budget
    from common.train import select_device, train_local

    cfg = load(args.config, args.overrides)
    mode = args.variant
    if mode == "nondp":
        cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=False))
    else:
        cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=True, grad_sample_mode=mode))
    data = _load_cache(Path(args.cache)) if args.cache else _site_data(cfg, args.site, args.records)
    device = select_device(cfg.train.device)
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    parameters = count_parameters(model)  # before training freezes any
    diffusion = GaussianDiffusion(cfg.diffusion)

    def budget():
        if mode == "nondp":
            return None
        # A generous target, so the budget never stops a benchmark; sigma as calibrated for the real plan.
        privacy = replace(cfg.privacy, target_epsilon=1e6, noise_multiplier=1.0)
        return plan_budget("bench", privacy, cfg.train.batch_size, len(data), args.warmup + args.steps)

    trainable = cfg.federation.trainable if args.trainable else ()
    train_local(model, diffusion, data, cfg, args.warmup, budget=budget(), trainable=trainable, progress=False, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_local(model, diffusion, data, cfg, args.steps, budget=budget(), trainable=trainable,
                         progress=False, seed=2)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "variant": mode,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": cfg.model.size,
        "parameters": parameters,
        "trained_parameters": count_parameters(model),
        "batch_size": cfg.train.batch_size,
        "steps": result.steps,
        "examples": result.examples,
        "seconds": seconds,
        "samples_per_s": result.examples / seconds,
        "s_per_step": seconds / max(1, result.steps),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "activation_checkpointing": cfg.model.activation_checkpointing,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default="nondp,hooks")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--site", type=int, default=0)
    parser.add_argument("--records", type=int, default=0, help="use only the site's first N records")
    parser.add_argument("--cache", help="npz written by --export-cache (no PTB-XL needed)")
    parser.add_argument("--export-cache", help="write the site's records to this npz and exit")
    parser.add_argument("--trainable", action="store_true",
                        help="train only the config's federation.trainable prefixes (its DP fine-tuning subset)")
    parser.add_argument("--json", help="append results as JSON lines here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args(argv)

    if args.export_cache:
        from common.config import load

        export_cache(load(args.config, args.overrides), Path(args.export_cache), args.site, args.records or 1000)
        return 0
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    results = []
    for variant in args.variants.split(","):
        command = [sys.executable, "-m", "simulations.benchmarks.bench_train", "--variant", variant, *_forward(args)]
        results.append(run_isolated(command, {"variant": variant}, args.json))
    base = next((r for r in results if r["variant"] == "nondp" and "error" not in r), None)
    if base:
        print(f"\n{base['model']}: {base['trained_parameters']:,} of {base['parameters']:,} parameters trained")
    print(f"\n{'variant':>10} {'samples/s':>10} {'s/step':>8} {'peak GiB':>9} {'x non-DP':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>10}  FAILED: {r['error']}")
            continue
        ratio = base["samples_per_s"] / r["samples_per_s"] if base else float("nan")
        peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['variant']:>10} {r['samples_per_s']:10.2f} {r['s_per_step']:8.3f} {peak:>9} {ratio:9.2f}")
    return 0


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup), "--site", str(args.site)]
    for o in args.overrides:
        out += ["--set", o]
    if args.records:
        out += ["--records", str(args.records)]
    if args.cache:
        out += ["--cache", args.cache]
    if args.trainable:
        out.append("--trainable")
    return out


if __name__ == "__main__":
    sys.exit(main())
