"""Denoising error per timestep: where along the noise process a checkpoint has learned, and where not.

    python -m simulations.benchmarks.bench_denoise_by_t CHECKPOINT [CHECKPOINT ...] --data ../shared/ptb-xl

For each checkpoint (a run, checkpoint or bundle directory) the same --records records of the validation
folds (the ones bench_quality_curve conditions on) are noised at each --timesteps step with the same noise,
and the model's implied eps and x0 are compared with the truth (mean squared error in public lead scales). Checkpoints with another
`diffusion.prediction` are compared on equal terms, because both errors are computed from the output each
parameterisation implies. High eps error at small t leaves visible noise in the samples; high x0 error at
large t leaves the sample's layout (where the beats go) to chance.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def denoising_errors(gen, data, timesteps: list[int], seed: int = 0) -> list[tuple[int, float, float]]:
    """(t, eps MSE, x0 MSE) of a generator's model (an ECGGenerator: .model, .diffusion) on `data`
    (TrainingData, normalized) at each t."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in timesteps:
        t = torch.full((len(data),), step, dtype=torch.long)
        noise = torch.randn(data.signals.shape, generator=g)
        x_t = gen.diffusion.q_sample(data.signals, t, noise)
        with torch.no_grad():
            output = gen.model(x_t, t, data.labels, data.demographics, None)
        x0_hat, eps_hat = gen.diffusion.split_output(x_t, t, output)
        rows.append((step, float((eps_hat - noise).pow(2).mean()), float((x0_hat - data.signals).pow(2).mean())))
    return rows


def main(argv: list[str] | None = None) -> int:
    from common.bundle import load_generator
    from common.config import load
    from common.normalization import federated_normalizer
    from common.train import TrainingData
    from simulations.benchmarks.bench_quality_curve import _held_out

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, help="a PTB-XL folder in the official layout")
    parser.add_argument("--config", default="configs/quality_cpu.yaml", help="its validation folds are scored")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 5, 20, 50, 100, 150, 190, 199])
    args = parser.parse_args(argv)
    cfg = load(args.config, [f"data.root={args.data}"])
    held_out, _ = _held_out(cfg, args.records)  # the records bench_quality_curve conditions on
    data = TrainingData.from_dataset(held_out, federated_normalizer())
    print(f"{'checkpoint':<48} {'t':>4} {'eps MSE':>9} {'x0 MSE':>9}")
    for checkpoint in args.checkpoints:
        for step, eps_mse, x0_mse in denoising_errors(load_generator(checkpoint), data, args.timesteps):
            print(f"{str(checkpoint):<48} {step:>4} {eps_mse:>9.4f} {x0_mse:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
