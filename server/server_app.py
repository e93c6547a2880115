"""Flower ServerApp: rounds of site training, aggregation, checkpoints, the epsilon table, the certificate.

Each round: send the global weights and the run key, collect site weights and their public numbers,
aggregate, checkpoint (safetensors + JSON), log each site's epsilon, and every K rounds sample a PNG from
the global model. A site whose budget is spent answers "budget exhausted"; once no site can train, the run
ends cleanly. Under DP sites send no losses or timings: those stay in each site's own log.
"""

from __future__ import annotations

import csv
import json
import logging
import secrets
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from common.bundle import (
    WEIGHTS,
    build_generator,
    initial_state,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from common.config import Config, RunSpec, save as save_config
from common.hashing import sha256_file
from common.normalization import federated_normalizer
from common.privacy import build_certificate, write_certificate
from common.run_dir import default_run_dir, write_latest
from common.scp import SCP_CODES
from server.strategy import LedgerConflict, PrivacyLedger, build_strategy, load_strategy_state, save_strategy_state

log = logging.getLogger("fedecg.server")
ROUND_TIMEOUT_S = 3600.0
METRIC_FIELDS = (
    "round", "site", "epsilon", "steps", "steps-total", "num-records", "loss", "eps-loss", "mel-loss",
    "train-seconds", "round-seconds", "budget-exhausted",
)


def run_directory(spec: RunSpec, cfg: Config) -> Path:
    if spec.run_dir:
        return Path(spec.run_dir)
    return default_run_dir(cfg)


def _append_metrics(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _site_name(message: Message) -> str:
    return str(message.content["site"]["name"])


def run_server(grid: Grid, context: Context, spec: RunSpec) -> Path:
    cfg = spec.load()
    fc = cfg.federation
    run_dir = run_directory(spec, cfg)
    ckpt_root = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    normalizer = federated_normalizer()
    strategy = build_strategy(cfg)
    ledger = PrivacyLedger()
    start_round = 1

    if spec.resume:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoint to resume from")
        state, saved_cfg, _, progress = read_checkpoint(latest)
        if saved_cfg != cfg:
            raise ValueError(f"--resume: the config differs from the one {run_dir} was started with")
        load_strategy_state(latest / "strategy.safetensors", strategy)
        ledger = PrivacyLedger.from_json((latest / "ledger.json").read_text())
        start_round = int(progress["round"]) + 1
        run_key = str(progress["run_key"])
        log.info("resuming %s after round %d", run_dir, start_round - 1)
    else:
        if latest_checkpoint(run_dir) is not None:
            raise FileExistsError(f"{run_dir} already holds a run; use --resume or a new run directory")
        save_config(cfg, run_dir)
        run_key = secrets.token_hex(16)  # names this run in every site's ledger; kept by checkpoints for --resume
        state, base = initial_state(cfg)
        if base is not None:
            (run_dir / "base_model.json").write_text(json.dumps(base, indent=2))

    arrays = ArrayRecord(state)
    last_round = fc.rounds if not spec.until_round else min(fc.rounds, spec.until_round)
    for server_round in range(start_round, last_round + 1):
        round_start = time.perf_counter()
        config = ConfigRecord({"proximal-mu": fc.proximal_mu if fc.strategy == "fedprox" else 0.0, "run-key": run_key})
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        replies = list(grid.send_and_receive(messages=messages, timeout=ROUND_TIMEOUT_S))
        for m in replies:
            if m.has_error():
                log.error("round %d: node %d failed: %s", server_round, m.metadata.src_node_id, m.error.reason)
        ok = [m for m in replies if not m.has_error()]
        rows = [_record_reply(m, ledger, server_round) for m in ok]
        training = [m for m in ok if "arrays" in m.content]
        if len(ok) < fc.min_sites and training:
            raise RuntimeError(f"round {server_round}: {len(ok)} sites answered, fewer than min_sites={fc.min_sites}")
        if not training:
            _append_metrics(run_dir / "metrics.csv", rows)
            if ok:
                log.warning("round %d: every site's privacy budget is exhausted; ending the run", server_round)
                break
            raise RuntimeError(f"round {server_round}: no site answered")
        arrays, _ = strategy.aggregate_train(server_round, training)
        rows.append({"round": server_round, "site": "global", "round-seconds": time.perf_counter() - round_start,
                     "epsilon": max((float(r.get("epsilon", 0.0)) for r in rows), default=0.0)})
        _append_metrics(run_dir / "metrics.csv", rows)
        _checkpoint(ckpt_root, server_round, arrays, strategy, ledger, cfg, normalizer, run_key)
        log.info("round %d done in %.1fs\n%s", server_round, rows[-1]["round-seconds"], ledger.table())
        if fc.sample_every and server_round % fc.sample_every == 0:
            _sample_png(cfg, arrays, normalizer, run_dir / f"samples_round{server_round:03d}.png", server_round)
        if fc.evaluate_every and server_round % fc.evaluate_every == 0:
            _monitor(cfg, arrays, normalizer, run_dir, server_round)
        if server_round < last_round and all(r.get("budget-exhausted") for r in rows[:-1]):
            log.warning("round %d: every site has spent its privacy budget; ending the run", server_round)
            break

    if cfg.evaluation.site_records > 0:
        _site_memorization(grid, arrays, run_dir)
    if cfg.privacy.enabled:
        weights = latest_checkpoint(run_dir) / WEIGHTS
        base_file = run_dir / "base_model.json"
        base = json.loads(base_file.read_text()) if base_file.is_file() else None
        write_certificate(run_dir / "privacy.json",
                          build_certificate(cfg, ledger.budgets(), "federated", sha256_file(weights), base_model=base))
    if cfg.audit.pairs_per_site:
        _site_audit(grid, arrays, run_dir, run_key, cfg)
    _plot_rounds(run_dir)
    (run_dir / "epsilon_table.txt").write_text(ledger.table() + "\n")
    print(f"\nrun directory: {run_dir}\n{ledger.table()}", flush=True)
    return run_dir


def _record_reply(message: Message, ledger: PrivacyLedger, server_round: int) -> dict:
    """One site's reply as a metrics row; its budget goes into the ledger, which refuses conflicts."""
    name = _site_name(message)
    if "privacy" in message.content:
        try:
            ledger.update(message.metadata.src_node_id, name, str(message.content["privacy"]["budget"]))
        except LedgerConflict as err:
            log.error("round %d: %s", server_round, err)
            raise
    return {"round": server_round, "site": name, **dict(message.content["metrics"])}


def _site_memorization(grid: Grid, arrays: ArrayRecord, run_dir: Path) -> None:
    """Ask every site to check the final model for memorization of its own records; the reports stay there."""
    from flwr.app import MessageType, RecordDict

    messages = [
        Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type=f"{MessageType.EVALUATE}.memorization")
        for node in grid.get_node_ids()
    ]
    checked = []
    for reply in grid.send_and_receive(messages=messages, timeout=ROUND_TIMEOUT_S):
        if reply.has_error():
            log.error("site memorization check failed on node %d: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        checked.append(_site_name(reply))
    (run_dir / "site_memorization.json").write_text(json.dumps(
        {"checked_at_sites": sorted(checked),
         "note": "each site's report is in its own state directory (memorization.json) and never left it"}, indent=2))
    log.info("memorization checked inside sites %s; reports stay at the sites", sorted(checked))


def _site_audit(grid: Grid, arrays: ArrayRecord, run_dir: Path, run_key: str, cfg: Config) -> None:
    """Collect every site's canary-audit summary and write the pooled bound to audit.json."""
    from flwr.app import MessageType, RecordDict

    from common.privacy.audit import audit_report, audit_table

    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"run-key": run_key})})
    messages = [Message(content, dst_node_id=node, message_type=f"{MessageType.EVALUATE}.audit")
                for node in grid.get_node_ids()]
    summaries = {}
    for reply in grid.send_and_receive(messages=messages, timeout=ROUND_TIMEOUT_S):
        if reply.has_error():
            raise RuntimeError(f"canary audit failed on node {reply.metadata.src_node_id}: {reply.error.reason}")
        summaries[_site_name(reply)] = dict(reply.content["metrics"])
    certificate = run_dir / "privacy.json"
    certified = json.loads(certificate.read_text())["release"]["epsilon"] if certificate.is_file() else None
    ac = cfg.audit
    report = audit_report(summaries, ac.guess_fractions, cfg.privacy.delta, ac.confidence, certified)
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2))
    log.info("canary audit:\n%s", audit_table(report))


def _checkpoint(root, server_round, arrays, strategy, ledger, cfg, normalizer, run_key: str) -> None:
    name = f"round_{server_round:04d}"
    directory = root / name
    save_checkpoint(
        directory,
        arrays.to_torch_state_dict(),
        cfg,
        normalizer,
        progress={"round": server_round, "kind": "federated", "run_key": run_key},
    )
    save_strategy_state(directory / "strategy.safetensors", strategy)
    (directory / "ledger.json").write_text(ledger.to_json())
    write_latest(root.parent, name)  # written last: a crash mid-checkpoint leaves the previous one current


def _sample_png(cfg: Config, arrays: ArrayRecord, normalizer, path: Path, server_round: int) -> None:
    from common.generate import generate, grid_conditions
    from common.plotting import plot_ecg_grid

    gen = build_generator(cfg, arrays.to_torch_state_dict(), normalizer, path.parent)
    labels, demo, mask, titles = grid_conditions(SCP_CODES, 4)
    signals = generate(gen, labels, demo, mask, seed=server_round, progress=False)
    plot_ecg_grid(signals, path, titles=[f"round {server_round}: {t}" for t in titles])


def _monitor(cfg: Config, arrays: ArrayRecord, normalizer, run_dir: Path, server_round: int) -> None:
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


def _plot_rounds(run_dir: Path) -> None:
    from common.plotting import plot_curves

    rows = [r for r in _read_metrics(run_dir / "metrics.csv") if r["site"] != "global"]
    if rows:
        keys = ["epsilon", "steps-total"] if rows[0].get("loss") in (None, "") else ["loss", "mel-loss"]
        plot_curves(rows, "round", keys, run_dir / "rounds.png", "per site", group_key="site")


def build_server_app(spec: RunSpec | None = None, failures: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp bound to `spec` (or reading it from the run config); exceptions are also put in `failures`,
    because the simulation engine logs a failing ServerApp instead of raising to its caller."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_server(grid, context, spec or RunSpec.from_run_config(dict(context.run_config)))
        except BaseException as err:
            if failures is not None:
                failures.append(err)
            raise

    return app


app = build_server_app()
