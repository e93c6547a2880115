"""Many sites: a federation of 20 sites x 10 rounds on Flower's simulation engine, memory and overhead measured.

    python -m simulations.benchmarks.bench_many_sites --data ../shared/ptb-xl            # 20 sites x 10 rounds
    python -m simulations.benchmarks.bench_many_sites --data D --sites 8 --rounds 3 --out runs/bench-sites

Runs `fedecg simulate` as a child process (tiny model, iid partition over the first --records records, DP on) and
samples the resident memory of its process tree every 0.2 s: the driver process (it runs the ServerApp) and each
Ray worker (the sites' ClientApps). Per round it prints the server's wall time, the sites' own training time
(from each site's train_log.csv, which stays at the site) and the part of the round outside training, which is
Flower's and Ray's overhead plus the ClientApp's data and model set-up.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil


def _overrides(args: argparse.Namespace, out: Path) -> list[str]:
    return [
        f"data.root={args.data}", f"data.max_records={args.records}", f"data.cache_dir={out / 'cache'}",
        "partition.scheme=iid", f"partition.num_sites={args.sites}", "partition.public_sites=[]",
        "model.size=tiny", "federation.init_from=null", "diffusion.expert=null", f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}", f"federation.min_sites={args.sites}",
        f"federation.site_state_dir={out / 'sites'}", "federation.sample_every=0", "federation.num_cpus_per_site=1",
        "evaluation.site_records=0", "train.batch_size=16", "train.device=cpu",
    ]


def _sample_memory(proc: psutil.Popen, peaks: dict[str, int]) -> None:
    """Peak RSS of the driver and of the largest site worker, sampled until the run ends."""
    while proc.poll() is None:
        try:
            peaks["driver"] = max(peaks["driver"], proc.memory_info().rss)
            workers = [c for c in proc.children(recursive=True) if "ray::" in " ".join(c.cmdline()[:1])]
            for child in workers:
                peaks["worker"] = max(peaks["worker"], child.memory_info().rss)
            peaks["workers_seen"] = max(peaks["workers_seen"], len(workers))
            tree = [proc, *proc.children(recursive=True)]
            peaks["tree"] = max(peaks["tree"], sum(p.memory_info().rss for p in tree if p.is_running()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
        time.sleep(0.2)


def _round_times(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as handle:
        return {int(r["round"]): float(r["round-seconds"]) for r in csv.DictReader(handle) if r["site"] == "global"}


def _training_times(sites_dir: Path) -> dict[int, list[float]]:
    per_round: dict[int, list[float]] = defaultdict(list)
    for log in sorted(sites_dir.glob("*/train_log.csv")):
        with log.open() as handle:
            for row in csv.DictReader(handle):
                per_round[int(row["round"])].append(float(row["seconds"]))
    return per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="PTB-XL folder")
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--records", type=int, default=3000, help="first N records of the metadata")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-many-sites", help="fresh folder for the run and the sites")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: exists and is not empty; choose a new folder")
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--config", "configs/quickstart.yaml",
               "--out", str(out / "run")]
    for text in _overrides(args, out):
        command += ["--set", text]
    peaks = {"driver": 0, "worker": 0, "tree": 0, "workers_seen": 0}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "simulate.log").open("w") as log:
        proc = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _sample_memory(proc, peaks)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the simulation failed (rc {proc.returncode}); see {out / 'simulate.log'}")
    rounds, training = _round_times(out / "run"), _training_times(out / "sites")
    parallel = min(args.sites, psutil.cpu_count() or 1)  # one CPU per site: this many train at once
    print(f"{args.sites} sites x {args.rounds} rounds, {args.local_steps} DP steps per round, wall {wall:.0f} s")
    print(f"peak RSS: driver (ServerApp) {peaks['driver'] / 2**20:.0f} MiB, largest site worker "
          f"{peaks['worker'] / 2**20:.0f} MiB, whole tree {peaks['tree'] / 2**20:.0f} MiB "
          f"({peaks['workers_seen']} Ray workers at most)")
    print(f"{'round':>5} {'round s':>8} {'train s (sum)':>14} {'train s / parallel':>19} {'outside training':>17}")
    for n, seconds in sorted(rounds.items()):
        train_sum = sum(training.get(n, []))
        share = 1.0 - min(1.0, train_sum / parallel / seconds)
        print(f"{n:5d} {seconds:8.1f} {train_sum:14.1f} {train_sum / parallel:19.1f} {share:16.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
