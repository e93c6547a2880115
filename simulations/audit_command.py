"""`fedecg privacy audit`: train the configured federation with canaries planted at its sites, print the audit.

The run is an audit, not a release: it trains on the sites' records plus one canary per slot, so its
weights are not the product's. Its simulated sites keep their ledgers in the audit's own directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import ConfigError, RunSpec, load

DEFAULT_PAIRS = 64


def audit_overrides(args: argparse.Namespace, out: Path) -> list[str]:
    cfg = load(args.config, args.overrides)
    pairs = args.pairs if args.pairs is not None else (cfg.audit.pairs_per_site or DEFAULT_PAIRS)
    if pairs < 1:
        raise ConfigError(f"--pairs {pairs}: an audit needs at least one canary slot per site")
    return [
        *args.overrides,
        f"audit.pairs_per_site={pairs}",
        f"federation.site_state_dir={out / 'sites'}",
        "evaluation.site_records=0",  # the memorization check is an evaluation, not part of the audit
        "federation.sample_every=0",
    ]


def cmd_audit(args: argparse.Namespace) -> int:
    from common.privacy.audit import audit_table
    from simulations.simulate import simulate

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; an audit starts from fresh sites and a fresh run directory")
    overrides = audit_overrides(args, out)
    run_dir = simulate(RunSpec(args.config, tuple(overrides), str(out / "run")))
    report = json.loads((run_dir / "audit.json").read_text())
    table = audit_table(report)
    (out / "audit_table.txt").write_text(table + "\n")
    print(f"\ncanary audit of {args.config} ({out})\n{table}")
    return 0


def register(privacy_sub: argparse._SubParsersAction, add_config_args) -> None:
    p = privacy_sub.add_parser("audit", help="one-run canary audit: an empirical lower bound on epsilon")
    add_config_args(p)
    p.add_argument("--pairs", type=int, default=None,
                   help=f"canary slots per site (default: audit.pairs_per_site, else {DEFAULT_PAIRS})")
    p.add_argument("--out", required=True, help="audit directory: run/, sites/, audit_table.txt")
    p.set_defaults(func=cmd_audit)
