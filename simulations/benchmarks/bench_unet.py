"""Training throughput of the U-Net denoiser against the full-resolution SSSD stack, non-DP and DP, on CPU.

    python -m simulations.benchmarks.bench_unet                       # unet, unet sized like small, small
    python -m simulations.benchmarks.bench_unet --models "unet:48,96,144;unet:64,128,192;unet:64,128,256"

Models: a preset name (small, tiny, sssd, unet), `unet:C0,C1,C2` (the unet preset with these level widths)
or `unet=small` (the unet preset's width ratios, base width chosen so the parameter count is closest to
small's). Every (model, mode) runs in its own subprocess, through THE training loop (common.train.train_local)
with the eps + mel loss; DP uses Opacus hooks with a budget from plan_budget at a fixed noise multiplier.
Inputs are random tensors of the real shapes ([N, 8, 1000] signals, 71 multi-hot labels, 8 demographics):
step times do not depend on values. Prints samples/s (examples drawn / wall time, after a warm-up call,
best of --repeats so that other load on the machine distorts it least) and the DP/non-DP cost per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from simulations.benchmarks.isolated import run_isolated

LENGTH = 1000
RECORDS_PER_BATCH = 10  # N = 10 batches: DP's Poisson rate q = 0.1 draws ~batch examples per step


def _build(name: str):
    """(model, model config) for a model name; see the module docstring."""
    from common.config import ModelConfig
    from common.model.denoiser import build_denoiser, count_parameters
    from common.model.unet import UNET_PRESET, UNetDenoiser

    if name.startswith("unet:"):
        channels = tuple(int(c) for c in name.removeprefix("unet:").split(","))
        return UNetDenoiser(replace(UNET_PRESET, channels=channels)), ModelConfig(size="unet")
    if name.startswith("unet="):
        target = count_parameters(build_denoiser(ModelConfig(size=name.removeprefix("unet="))))
        candidates = []  # (|count - target|, config), widening until the count passes the target
        for width in range(UNET_PRESET.groups, 10**4, UNET_PRESET.groups):
            cfg = ModelConfig(size="unet", channels=width)
            count = count_parameters(build_denoiser(cfg))
            candidates.append((abs(count - target), width, cfg))
            if count >= target:
                break
        cfg = min(candidates)[2]
        return build_denoiser(cfg), cfg
    cfg = ModelConfig(size=name)
    return build_denoiser(cfg), cfg


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from common.config import Config, TrainConfig
    from common.diffusion import GaussianDiffusion
    from common.model.denoiser import count_parameters
    from common.privacy import plan_budget
    from common.train import TrainingData, train_local

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, model_cfg = _build(args.model)
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=args.batch, device="cpu", log_every=10**9))
    dp = args.mode == "dp"
    cfg = replace(cfg, privacy=replace(cfg.privacy, enabled=dp, grad_sample_mode="hooks", noise_multiplier=1.0))
    records = args.batch * RECORDS_PER_BATCH
    g = torch.Generator().manual_seed(0)
    data = TrainingData(
        torch.randn(records, 8, LENGTH, generator=g),
        (torch.rand(records, 71, generator=g) < 0.05).float(),
        torch.randn(records, 8, generator=g),
    )
    diffusion = GaussianDiffusion(cfg.diffusion)

    def budget(steps: int):
        if not dp:
            return None
        # A generous target, so the budget never stops a benchmark; sigma fixed.
        return plan_budget("bench", replace(cfg.privacy, target_epsilon=1e6), args.batch, records, steps)

    train_local(model, diffusion, data, cfg, args.warmup, budget=budget(args.warmup), progress=False, seed=1)
    runs = []  # (examples, wall s, CPU s) per repeat; the best repeat is the least disturbed by other load
    for repeat in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train_local(model, diffusion, data, cfg, args.steps, budget=budget(args.steps), progress=False,
                             seed=2 + repeat)  # fmt: skip
        runs.append((result.examples, time.perf_counter() - start, time.process_time() - cpu_start))
    examples, seconds, cpu_seconds = max(runs, key=lambda run: run[0] / run[1])
    channels = getattr(getattr(model, "spec", None), "channels", None)
    return {
        "model": args.model,
        "mode": args.mode,
        "channels": list(channels) if isinstance(channels, tuple) else channels,
        "parameters": count_parameters(model),
        "threads": torch.get_num_threads(),
        "examples": examples,
        "seconds": seconds,
        "samples_per_s": examples / seconds,
        "cpu_ms_per_sample": 1e3 * cpu_seconds / examples,
        "all_samples_per_s": [round(n / wall, 2) for n, wall, _ in runs],
    }


def _table(results: list[dict]) -> None:
    """One row per model: samples/s non-DP and DP (wall), DP/non-DP cost per sample, CPU ms per sample."""
    print(
        f"\n{'model':>16} {'channels':>12} {'params':>10} {'non-DP/s':>9} {'DP/s':>7} {'DP/non-DP':>10}"
        f" {'CPU ms non-DP':>14} {'CPU ms DP':>10}"
    )
    for name in dict.fromkeys(r["model"] for r in results):
        rows = {r["mode"]: r for r in results if r["model"] == name}
        for mode, r in rows.items():
            if "error" in r:
                print(f"{name:>16}  {mode} FAILED: {r['error']}")
        ok = {mode: r for mode, r in rows.items() if "error" not in r}
        if not ok:
            continue
        first = next(iter(ok.values()))
        channels = ",".join(map(str, first["channels"])) if isinstance(first["channels"], list) else "-"

        def value(mode: str, key: str) -> float:
            return ok[mode][key] if mode in ok else float("nan")

        rate = {mode: value(mode, "samples_per_s") for mode in ("nondp", "dp")}
        cpu = {mode: value(mode, "cpu_ms_per_sample") for mode in ("nondp", "dp")}
        print(
            f"{name:>16} {channels:>12} {first['parameters']:>10,} {rate['nondp']:9.2f} {rate['dp']:7.2f}"
            f" {rate['nondp'] / rate['dp']:10.2f} {cpu['nondp']:14.1f} {cpu['dp']:10.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet;unet=small;small", help="';'-separated model names")
    parser.add_argument("--modes", default="nondp,dp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest is reported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="append results as JSON lines here")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model:
        print(json.dumps(run_variant(args)))
        return 0

    results = []
    for model in args.models.split(";"):
        for mode in args.modes.split(","):
            command = [
                sys.executable, "-m", "simulations.benchmarks.bench_unet", "--model", model, "--mode", mode,
                "--threads", str(args.threads), "--batch", str(args.batch),
                "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            ]  # fmt: skip
            results.append(run_isolated(command, {"model": model, "mode": mode}, args.json))
    _table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
