"""Benchmark the generator: training step with/without the MIDT mel loss, Opacus DP step (S4D grad sampler
vs functorch fallback), DDIM vs DDPM sampling, parameter counts.

    python -m simulations.benchmarks.bench_model --size small --batch 32 --steps 3 --device cpu
    python -m simulations.benchmarks.bench_model --size sssd --batch 32 --steps 10 --device cuda

Each variant runs in its own subprocess, so CUDA peak memory (torch.cuda.max_memory_allocated) and
Opacus' grad-sampler registry are clean per variant. Inputs are random tensors of the real shapes
([B, 8, 1000] signals, 71 multi-hot labels, 8 demographic values): step times do not depend on values.
Targets: mel loss adds <= 15% to a step; a DP step costs <= 2x a non-DP step per sample; DDIM-50 is
>= 3.5x faster than DDPM-200.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

LENGTH = 1000
NUM_LABELS = 71
DEMO_DIM = 8
LEADS = 8

TRAIN_VARIANTS = ("train_eps", "train_eps_mel", "dp_sampler", "dp_functorch")
SAMPLE_VARIANTS = ("ddim50", "ddpm200")
ALL_VARIANTS = TRAIN_VARIANTS + SAMPLE_VARIANTS


@dataclass
class Timing:
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per whole step

    def add(self, cpu: float, forward: float, backward: float, step: float) -> None:
        self.cpu.append(cpu)
        self.forward.append(forward)
        self.backward.append(backward)
        self.step.append(step)

    def summary(self) -> dict[str, float]:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        total = [f + b + s for f, b, s in zip(self.forward, self.backward, self.step)]
        return {
            "forward_s": mean(self.forward),
            "backward_s": mean(self.backward),
            "optim_s": mean(self.step),
            "step_s": mean(total),
            "cpu_s": mean(self.cpu),
        }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(batch: int, generator: Any, device: Any) -> tuple[Any, Any, Any]:
    import torch

    x0 = torch.randn(batch, LEADS, LENGTH, generator=generator).to(device)
    labels = (torch.rand(batch, NUM_LABELS, generator=generator) < 0.05).float().to(device)
    demographics = torch.randn(batch, DEMO_DIM, generator=generator).to(device)
    return x0, labels, demographics


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process; returns its measurements."""
    import torch

    from common.config import DiffusionConfig, ModelConfig
    from common.diffusion import GaussianDiffusion
    from common.model.denoiser import build_denoiser, count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(size=args.size)).to(device)
    diffusion = GaussianDiffusion(DiffusionConfig())
    generator = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {
        "variant": args.variant,
        "params": count_parameters(model),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    use_amp = args.amp and device.type == "cuda"
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    timed = _time_sampling if args.variant in SAMPLE_VARIANTS else _time_training
    result.update(timed(args, model, diffusion, generator, device, autocast))
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _time_sampling(args: argparse.Namespace, model: Any, diffusion: Any, generator: Any, device: Any,
                   autocast: Any) -> dict[str, Any]:
    """One DDIM-50 or DDPM-200 draw of --sample-batch samples, after a short warm-up draw."""
    import torch

    sampler, steps = ("ddim", 50) if args.variant == "ddim50" else ("ddpm", None)
    labels = (torch.rand(args.sample_batch, NUM_LABELS, generator=generator) < 0.05).float().to(device)
    demographics = torch.randn(args.sample_batch, DEMO_DIM, generator=generator).to(device)
    with autocast:
        diffusion.sample(model, labels, demographics, steps=3, sampler="ddim", length=LENGTH)  # warm-up
        _sync(device)
        cpu_start, start = time.process_time(), time.perf_counter()
        diffusion.sample(
            model, labels, demographics, steps=steps, sampler=sampler, generator=generator, length=LENGTH,
            progress=args.progress,
        )  # fmt: skip
        _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": elapsed, "cpu_s": cpu, "per_sample_s": elapsed / args.sample_batch, "batch": args.sample_batch}


def _time_training(args: argparse.Namespace, model: Any, diffusion: Any, generator: Any, device: Any,
                   autocast: Any) -> dict[str, Any]:
    """--warmup untimed then --steps timed training steps (eps or eps + mel; under Opacus for dp_*)."""
    import torch

    from common.config import MidtConfig
    from common.losses import MelSpectrogramLoss
    from common.privacy.samplers import (
        modules_on_functorch_fallback,
        s4d_functorch_fallback,
    )

    use_mel = args.variant != "train_eps"
    mel_loss = MelSpectrogramLoss(MidtConfig()).to(device) if use_mel else None
    mel_weight = MidtConfig().weight if use_mel else 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    trained = model
    result: dict[str, Any] = {}
    fallback = s4d_functorch_fallback() if args.variant == "dp_functorch" else contextlib.nullcontext()
    with fallback:
        if args.variant.startswith("dp_"):
            result["functorch_fallback_modules"] = modules_on_functorch_fallback(model)
            trained, optimizer = _make_private(model, optimizer, args.batch, generator)
        timing = Timing()
        for step in range(args.warmup + args.steps):
            batch = _batch(args.batch, generator, device)
            phases = _timed_step(trained, optimizer, diffusion, batch, mel_loss, mel_weight, device, autocast)
            if step >= args.warmup:
                timing.add(*phases)
        result.update(timing.summary(), batch=args.batch)
        result["per_sample_s"] = result["step_s"] / args.batch
        result["per_sample_cpu_s"] = result["cpu_s"] / args.batch
    return result


def _make_private(model: Any, optimizer: Any, batch: int, generator: Any) -> tuple[Any, Any]:
    """Opacus' hooks on the model and a DP optimizer, over one fixed batch (per-sample times stay comparable)."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(*_batch(batch, generator, torch.device("cpu")))
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=batch),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    return trained, optimizer


def _timed_step(trained: Any, optimizer: Any, diffusion: Any, batch: tuple[Any, Any, Any], mel_loss: Any,
                mel_weight: float, device: Any, autocast: Any) -> tuple[float, float, float, float]:
    """One training step: (process CPU, forward, backward, optimizer) seconds, the device synchronized between."""
    x0, labels, demographics = batch
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    with autocast:
        losses = diffusion.training_losses(
            trained, x0, labels, demographics, mel_loss=mel_loss, mel_weight=mel_weight, cond_dropout=0.1
        )
    loss = losses["loss"].float().mean()
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    optimizer.step()
    _sync(device)
    t3 = time.perf_counter()
    c3 = time.process_time()
    return c3 - c0, t1 - t0, t2 - t1, t3 - t2


def parameter_counts() -> dict[str, int]:
    import torch

    from common.config import ModelConfig
    from common.model.denoiser import PRESETS, build_denoiser, count_parameters

    with torch.device("meta"):  # counts only: no memory for the 55M-parameter preset
        return {size: count_parameters(build_denoiser(ModelConfig(size=size))) for size in PRESETS}


def _child(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "simulations.benchmarks.bench_model",
        "--variant", variant,
        "--size", args.size,
        "--batch", str(args.batch),
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--device", args.device,
        "--sample-batch", str(args.sample_batch),
        "--threads", str(args.threads),
    ] + (["--amp"] if args.amp else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-12:]
        return {"variant": variant, "error": "\n    ".join(tail) if tail else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.sample_batch < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --sample-batch must be positive, --warmup non-negative")

    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    results = _run_children(args, variants)
    on_cpu = args.device == "cpu"
    _print_table(args, variants, results, on_cpu)
    _print_ratios(results, on_cpu)
    print("\nparameter counts")
    for size, count in parameter_counts().items():
        print(f"  {size:<6} {count:>12,}")
    return 0 if all("error" not in r for r in results.values()) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=("tiny", "small", "sssd"))
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per variant")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--sample-batch", type=int, default=8, help="samples drawn by the DDIM/DDPM variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA, as common.train does")
    parser.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help=f"comma-separated subset of {', '.join(ALL_VARIANTS)}"
    )
    parser.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    return parser


def _run_children(args: argparse.Namespace, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Each variant in its own subprocess, in order; its measurements (or its error) by name."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    results: dict[str, dict[str, Any]] = {}
    iterator = tqdm(variants, desc="variants", leave=False) if tqdm else variants
    for variant in iterator:
        if tqdm:
            iterator.set_postfix(variant=variant)
        results[variant] = _child(args, variant)
    return results


def _wall(variant: str, r: dict[str, Any]) -> float:
    """Wall-clock seconds of a variant: the whole draw for sampling, one step for training."""
    return r["seconds"] if variant in SAMPLE_VARIANTS else r["step_s"]


def _print_table(args: argparse.Namespace, variants: list[str], results: dict[str, dict[str, Any]], on_cpu: bool) -> None:
    threads = next((r["threads"] for r in results.values() if "threads" in r), "?")
    print(
        f"\nbench_model: size={args.size} batch={args.batch} steps={args.steps} device={args.device} "
        f"threads={threads} amp={args.amp}"
    )
    if on_cpu:
        print("(cpu s = process CPU time; ratios use it, so other load on a shared machine does not skew them)")
    header = (
        f"{'variant':<14} {'step s':>8} {'cpu s':>8} {'fwd s':>7} {'bwd s':>7} {'optim s':>8} "
        f"{'ms/sample':>10} {'samples/s':>10} {'peak GB':>8}"
    )
    print(header)
    print("-" * len(header))
    for variant in variants:
        r = results[variant]
        if "error" in r:
            print(f"{variant:<14} failed:\n    {r['error']}")
            continue
        if variant in SAMPLE_VARIANTS:
            phases = ("", "", "")
        else:
            phases = (_fmt(r["forward_s"]), _fmt(r["backward_s"]), _fmt(r["optim_s"]))
        cpu = _fmt(r.get("cpu_s") if on_cpu else None)
        print(
            f"{variant:<14} {_fmt(_wall(variant, r)):>8} {cpu:>8} {phases[0]:>7} {phases[1]:>7} {phases[2]:>8} "
            f"{_fmt(1000 * r['per_sample_s'], 1):>10} {_fmt(1 / r['per_sample_s'], 2):>10} "
            f"{_fmt(r.get('peak_mem_gb'), 2):>8}"
        )
    for variant in variants:
        fallback = results[variant].get("functorch_fallback_modules")
        if fallback is not None:
            shown = "none" if not fallback else f"{len(fallback)} modules ({', '.join(fallback[:2])}, ...)"
            print(f"{variant}: modules on Opacus' functorch fallback: {shown}")


def _print_ratios(results: dict[str, dict[str, Any]], on_cpu: bool) -> None:
    """The targets of the module docstring, met or missed (CPU time on a CPU, else wall-clock time)."""
    key = "cpu_s" if on_cpu else None

    def ratio(a: str, b: str) -> float | None:
        """Time of variant a over variant b (same batch for training variants, so per step = per sample)."""
        if a not in results or b not in results or "error" in results[a] or "error" in results[b]:
            return None
        ra, rb = results[a], results[b]
        if key:
            return ra[key] / rb[key] * (rb.get("batch", 1) / ra.get("batch", 1))
        return _wall(a, ra) / _wall(b, rb) * (rb.get("batch", 1) / ra.get("batch", 1))

    print(f"\nratios of {'CPU' if on_cpu else 'wall-clock'} time (target)")
    checks = [
        ("mel loss overhead, eps+mel / eps", ratio("train_eps_mel", "train_eps"), "<= 1.15", lambda v: v <= 1.15),
        ("DP (S4D sampler) / non-DP, per sample", ratio("dp_sampler", "train_eps_mel"), "<= 2.0", lambda v: v <= 2.0),
        ("DP (functorch fallback) / non-DP, per sample", ratio("dp_functorch", "train_eps_mel"), "-", None),
        ("DP functorch / DP sampler", ratio("dp_functorch", "dp_sampler"), "-", None),
        ("DDPM-200 / DDIM-50", ratio("ddpm200", "ddim50"), ">= 3.5", lambda v: v >= 3.5),
    ]
    for name, value, target, ok in checks:
        verdict = "" if value is None or ok is None else ("  met" if ok(value) else "  MISSED")
        print(f"  {name:<46} {_fmt(value, 2):>6}  ({target}){verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
