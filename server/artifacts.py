"""What a federated run writes to its run directory, so that server_app.py holds only the Flower protocol.

    metrics.csv          one row per site per round, and a "global" row per aggregated round
    metrics_discarded.csv  rows of rounds a resumed run replayed (written but never checkpointed)
    checkpoints/round_NNNN/  weights, config, normalizer, strategy state, privacy ledger; LATEST names the newest
    base_model.json      the public base the run started from (when federation.init_from is set)
    public_expert.json   the public high-noise expert sampling uses (when diffusion.expert is set)
    samples_roundNNN.png every federation.sample_every rounds: a grid sampled from the global model
    monitoring.jsonl     every federation.evaluate_every rounds: fidelity against the server's reference set
    privacy.json         the certificate, from the ledger's site budgets (privacy.enabled)
    rounds.png, epsilon_table.txt   at the end of the run
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.bundle import WEIGHTS, build_generator, latest_checkpoint, read_checkpoint, save_checkpoint
from common.config import Config
from common.hashing import sha256_file
from common.normalization import Normalizer, federated_normalizer
from common.privacy import build_certificate, write_certificate
from common.run_dir import write_latest
from common.scp import SCP_CODES
from server.strategy import PrivacyLedger, load_strategy_state, save_strategy_state

log = logging.getLogger("fedecg.server")
METRIC_FIELDS = (
    "round", "site", "epsilon", "steps", "steps-total", "num-records", "loss", "eps-loss", "mel-loss",
    "train-seconds", "round-seconds", "budget-exhausted", "rejected",
)


class RunArtifacts:
    """The files of one federated run in `run_dir`."""

    def __init__(self, run_dir: Path, cfg: Config, normalizer: Normalizer | None = None) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.normalizer = normalizer or federated_normalizer()
        run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_public_models(self, base: dict[str, Any] | None, expert: dict[str, Any] | None) -> None:
        """Pin, at the start, the provenance of the public models the certificate will name."""
        for name, provenance in (("base_model.json", base), ("public_expert.json", expert)):
            if provenance is not None:
                (self.run_dir / name).write_text(json.dumps(provenance, indent=2))

    def _public_model(self, name: str) -> dict[str, Any] | None:
        path = self.run_dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    def resume(self, strategy: Any) -> tuple[dict, PrivacyLedger, int, str]:
        """(weights, ledger, last finished round, run key) of the latest checkpoint; restores `strategy` in place."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume: {self.run_dir} holds no checkpoint to resume from")
        state, saved_cfg, _, progress = read_checkpoint(latest)
        if saved_cfg != self.cfg:
            raise ValueError(f"--resume: the config differs from the one {self.run_dir} was started with")
        load_strategy_state(latest / "strategy.safetensors", strategy)
        ledger = PrivacyLedger.from_json((latest / "ledger.json").read_text())
        done = int(progress["round"])
        self.set_aside_metrics_after(done)
        return state, ledger, done, str(progress["run_key"])

    def set_aside_metrics_after(self, done: int) -> int:
        """Move metrics.csv rows of rounds after `done` (the latest checkpoint) to metrics_discarded.csv.

        A run stopped after a round's rows were written but before its checkpoint (or during a round that
        failed) replays that round when resumed: its rows would appear twice. They stay on record, apart;
        the spend they show is in the sites' ledgers and reported again by the replayed round. Returns how many.
        """
        path = self.run_dir / "metrics.csv"
        if not path.is_file():
            return 0
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames or list(METRIC_FIELDS), list(reader)
        later = [r for r in rows if int(r["round"]) > done]
        if not later:
            return 0
        discarded = self.run_dir / "metrics_discarded.csv"
        new = not discarded.exists()
        with discarded.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerows(later)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["round"]) <= done)
        tmp.replace(path)
        log.warning("resuming after round %d: %d metrics rows of later rounds (not checkpointed, replayed now) moved "
                    "to %s", done, len(later), discarded.name)
        return len(later)

    def append_metrics(self, rows: list[dict]) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        fields = METRIC_FIELDS
        if not new:  # a resumed run keeps the columns it started with, even if a later release added one
            with path.open(newline="") as handle:
                fields = tuple(next(csv.reader(handle), METRIC_FIELDS))
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def checkpoint(self, server_round: int, arrays: ArrayRecord, strategy: Any, ledger: PrivacyLedger,
                   run_key: str) -> None:
        name = f"round_{server_round:04d}"
        directory = self.checkpoints / name
        save_checkpoint(
            directory,
            arrays.to_torch_state_dict(),
            self.cfg,
            self.normalizer,
            progress={"round": server_round, "kind": "federated", "run_key": run_key},
        )
        save_strategy_state(directory / "strategy.safetensors", strategy)
        (directory / "ledger.json").write_text(ledger.to_json())
        write_latest(self.run_dir, name)  # written last: a crash mid-checkpoint leaves the previous one current

    def round_samples(self, server_round: int, arrays: ArrayRecord) -> None:
        """The sample grid and the monitoring row, on the rounds the config asks for them."""
        fc = self.cfg.federation
        if fc.sample_every and server_round % fc.sample_every == 0:
            sample_png(self.cfg, arrays, self.normalizer, self.run_dir / f"samples_round{server_round:03d}.png",
                       server_round)
        if fc.evaluate_every and server_round % fc.evaluate_every == 0:
            monitor(self.cfg, arrays, self.normalizer, self.run_dir, server_round)

    def certify(self, ledger: PrivacyLedger) -> None:
        """privacy.json for the latest checkpoint's weights, from every site's reported budget."""
        weights = latest_checkpoint(self.run_dir) / WEIGHTS
        write_certificate(self.run_dir / "privacy.json",
                          build_certificate(self.cfg, ledger.budgets(), "federated", sha256_file(weights),
                                            base_model=self._public_model("base_model.json"),
                                            public_expert=self._public_model("public_expert.json")))

    def finish(self, ledger: PrivacyLedger) -> None:
        plot_rounds(self.run_dir)
        (self.run_dir / "epsilon_table.txt").write_text(ledger.table() + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def sample_png(cfg: Config, arrays: ArrayRecord, normalizer: Normalizer, path: Path, server_round: int) -> None:
    from common.generate import generate, grid_conditions
    from common.plotting import plot_ecg_grid

    gen = build_generator(cfg, arrays.to_torch_state_dict(), normalizer, path.parent)
    labels, demo, mask, titles = grid_conditions(SCP_CODES, 4)
    signals = generate(gen, labels, demo, mask, seed=server_round, progress=False)
    plot_ecg_grid(signals, path, titles=[f"round {server_round}: {t}" for t in titles])


def monitor(cfg: Config, arrays: ArrayRecord, normalizer: Normalizer, run_dir: Path, server_round: int) -> None:
    """Fidelity of a small generated batch against the server-held reference set (the validation folds)."""
    from common.evaluation.fidelity import quick_fidelity
    from common.generate import generate
    from server.reference import reference_set

    reference = reference_set(cfg)
    if reference is None:
        log.info("round %d: no server-side reference data; skipping monitoring", server_round)
        return
    gen = build_generator(cfg, arrays.to_torch_state_dict(), normalizer, run_dir)
    synthetic = generate(
        gen, reference.labels, reference.demographics, reference.demographics_mask, seed=server_round, progress=False
    )
    scores = quick_fidelity(synthetic, reference.signals12())
    row = {"round": server_round, **scores}
    with (run_dir / "monitoring.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    log.info("round %d monitoring: %s", server_round, scores)


def plot_rounds(run_dir: Path) -> None:
    from common.plotting import plot_curves

    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["site"] != "global"]
    if rows:
        keys = ["epsilon", "steps-total"] if rows[0].get("loss") in (None, "") else ["loss", "mel-loss"]
        plot_curves(rows, "round", keys, run_dir / "rounds.png", "per site", group_key="site")
