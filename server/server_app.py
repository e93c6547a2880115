"""Flower ServerApp: rounds of site training, aggregation, checkpoints, the epsilon table, the certificate.

Each round (server/rounds.py): send the global weights and the run key, collect site weights and their public
numbers, check every site's update (a failing site is left out, its spend still recorded) and aggregate; under
federation.secure_aggregation the server learns only the sum (server/secure_aggregation.py). Then hand the
round to server/artifacts.py (metrics, checkpoint, sample PNGs, monitoring) and log each site's epsilon. A
site whose budget is spent answers "budget exhausted"; once no site can train, the run ends cleanly. Under DP
sites send no losses or timings: those stay in each site's own log.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from common.bundle import initial_state, latest_checkpoint
from common.config import Config, RunSpec
from common.config import save as save_config
from common.expert import expert_provenance
from common.rhythm import require_public_pool
from common.run_dir import default_run_dir
from server.artifacts import RunArtifacts
from server.rounds import ROUND_TIMEOUT_S, RoundFailed, play_round, site_name
from server.site_registry import load_site_registry
from server.strategy import PrivacyLedger, build_strategy

log = logging.getLogger("fedecg.server")


def run_directory(spec: RunSpec, cfg: Config) -> Path:
    if spec.run_dir:
        return Path(spec.run_dir)
    return default_run_dir(cfg)


def run_server(grid: Grid, context: Context, spec: RunSpec) -> Path:
    cfg = spec.load()
    require_public_pool(cfg.model.rhythm, "a federation")
    fc = cfg.federation
    artifacts = RunArtifacts(run_directory(spec, cfg), cfg)
    run_dir = artifacts.run_dir
    strategy = build_strategy(cfg)
    state, ledger, start_round, run_key = _resume(artifacts, strategy) if spec.resume else _start(artifacts)
    if spec.site_registry:
        ledger.seed(load_site_registry(spec.site_registry))
        log.info("site registry %s: replies are accepted only from each site's registered node (%s)",
                 spec.site_registry, ", ".join(f"{name}={node}" for name, node in sorted(ledger.nodes.items())))
    arrays = ArrayRecord(state)
    last_round = fc.rounds if not spec.until_round else min(fc.rounds, spec.until_round)
    for server_round in range(start_round, last_round + 1):
        round_start = time.perf_counter()
        try:
            played = play_round(grid, strategy, server_round, arrays, run_key, fc, ledger)
        except RoundFailed as err:
            artifacts.append_metrics(err.rows)  # the rejections are on record even when the round fails
            raise
        rows = played.rows
        if played.arrays is None:
            artifacts.append_metrics(rows)
            log.warning("round %d: every site's privacy budget is exhausted; ending the run", server_round)
            break
        arrays = played.arrays
        rows.append({"round": server_round, "site": "global", "round-seconds": time.perf_counter() - round_start,
                     "epsilon": max((float(r.get("epsilon", 0.0)) for r in rows), default=0.0)})
        artifacts.append_metrics(rows)
        artifacts.checkpoint(server_round, arrays, strategy, ledger, run_key)
        log.info("round %d done in %.1fs\n%s", server_round, rows[-1]["round-seconds"], ledger.table())
        artifacts.round_samples(server_round, arrays)
        if server_round < last_round and all(r.get("budget-exhausted") for r in rows[:-1]):
            log.warning("round %d: every site has spent its privacy budget; ending the run", server_round)
            break

    if cfg.evaluation.site_records > 0:
        _site_memorization(grid, arrays, run_dir, ledger)
    if cfg.privacy.enabled:
        artifacts.certify(ledger)
    if cfg.audit.pairs_per_site:
        _site_audit(grid, arrays, run_dir, run_key, cfg, ledger)
    artifacts.finish(ledger)
    print(f"\nrun directory: {run_dir}\n{ledger.table()}", flush=True)
    return run_dir


def _start(artifacts: RunArtifacts) -> tuple[dict, PrivacyLedger, int, str]:
    """A fresh run: (initial weights, empty ledger, first round 1, a new run key)."""
    if latest_checkpoint(artifacts.run_dir) is not None:
        raise FileExistsError(f"{artifacts.run_dir} already holds a run; use --resume or a new run directory")
    save_config(artifacts.cfg, artifacts.run_dir)
    run_key = secrets.token_hex(16)  # names this run in every site's ledger; kept by checkpoints for --resume
    state, base = initial_state(artifacts.cfg)
    artifacts.save_public_models(base, expert_provenance(artifacts.cfg, artifacts.normalizer))
    return state, PrivacyLedger(), 1, run_key


def _resume(artifacts: RunArtifacts, strategy) -> tuple[dict, PrivacyLedger, int, str]:
    state, ledger, done, run_key = artifacts.resume(strategy)
    log.info("resuming %s after round %d", artifacts.run_dir, done)
    return state, ledger, done + 1, run_key


def _site_memorization(grid: Grid, arrays: ArrayRecord, run_dir: Path, ledger: PrivacyLedger) -> None:
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
        ledger.bind(reply.metadata.src_node_id, site_name(reply))  # a site speaks only for itself
        checked.append(site_name(reply))
    (run_dir / "site_memorization.json").write_text(json.dumps(
        {"checked_at_sites": sorted(checked),
         "note": "each site's report is in its own state directory (memorization.json) and never left it"}, indent=2))
    log.info("memorization checked inside sites %s; reports stay at the sites", sorted(checked))


def _site_audit(grid: Grid, arrays: ArrayRecord, run_dir: Path, run_key: str, cfg: Config,
                ledger: PrivacyLedger) -> None:
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
        ledger.bind(reply.metadata.src_node_id, site_name(reply))
        summaries[site_name(reply)] = dict(reply.content["metrics"])
    certificate = run_dir / "privacy.json"
    certified = json.loads(certificate.read_text())["release"]["epsilon"] if certificate.is_file() else None
    ac = cfg.audit
    report = audit_report(summaries, ac.guess_fractions, cfg.privacy.delta, ac.confidence, certified)
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2))
    log.info("canary audit:\n%s", audit_table(report))


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
