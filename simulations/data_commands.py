"""`fedecg data ...`: check, download and partition PTB-XL.

    fedecg data verify [DIR]                                  # structure + SHA256SUMS.txt + summary
    fedecg data fetch --out DIR [--records N] [--base-url URL]
    fedecg data partition --config CFG [--set k=v ...] --out FILE.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# fetch needs only the standard library; heavy modules (pandas, wfdb) are imported by the handlers, so
# `fedecg --help` stays fast.
from common.data.fetch import DEFAULT_BASE_URL

_MAX_LISTED_PROBLEMS = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="check, download and partition PTB-XL")
    sub = parser.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("verify", help="check a PTB-XL folder (layout, SHA256SUMS.txt) and summarize it")
    p.add_argument("dir", nargs="?", metavar="DIR", help="PTB-XL folder (default: $PTBXL_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("fetch", help="download PTB-XL 1.0.3 (tables + records100) from PhysioNet, resumable")
    p.add_argument("--out", required=True, metavar="DIR", help="destination folder (then set PTBXL_DIR=DIR)")
    p.add_argument("--records", type=int, metavar="N", help="only the first N records by ecg_id (default: all)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL", help=f"mirror (default {DEFAULT_BASE_URL})")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("partition", help="split the data into simulated hospitals and write the split as JSON")
    p.add_argument("--config", required=True, help="YAML config file (its data and partition sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the partition (exact ecg_ids)")
    p.set_defaults(func=cmd_partition)


def _error(err: Exception) -> int:
    print(f"fedecg data: error: {err}", file=sys.stderr)
    return 2


def _format_summary(root: Path, summary: dict[str, Any]) -> str:
    def pairs(items: Any) -> str:
        return ", ".join(f"{k}: {v}" for k, v in items)

    missing = summary["missing"]
    lines = [
        f"PTB-XL at {root}",
        f"  records       {summary['records']}",
        f"  patients      {summary['patients']} (at most {summary['records_per_patient_max']} records per patient)",
        f"  sites         {summary['sites']}; largest: {pairs(summary['top_sites'])}; site missing: {summary['site_missing']}",
        f"  folds         {pairs(summary['folds'].items())}",
        f"  superclasses  {pairs(summary['superclasses'].items())}; none: {summary['no_superclass']}",
        f"  statements    {pairs(summary['top_statements'])}",
        f"  missing       {pairs(missing.items())}; age over 89 (coded 300): {summary['age_over_89']}",
    ]
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from common.data.fetch import SUMS_NAME, FetchError, verify_checksums
    from common.data.verify import check_structure, summarize_metadata

    location = args.dir or os.environ.get("PTBXL_DIR")
    if not location:
        return _error(ValueError("give the folder (fedecg data verify DIR) or set PTBXL_DIR"))
    root = Path(location)
    meta, problems = check_structure(root)
    checksum_note = f"  checksums     no {SUMS_NAME}: file contents not checked"
    if root.is_dir() and (root / SUMS_NAME).is_file():
        try:
            checked, sum_problems = verify_checksums(root, progress=not args.quiet)
        except FetchError as err:
            checked, sum_problems = 0, [str(err)]
        problems += sum_problems
        checksum_note = f"  checksums     {checked} files listed in {SUMS_NAME}, {len(sum_problems)} problem(s)"
    if meta is not None:
        print(_format_summary(root, summarize_metadata(meta)))
    print(checksum_note)
    if problems:
        for problem in problems[:_MAX_LISTED_PROBLEMS]:
            print(f"  FAIL {problem}", file=sys.stderr)
        if len(problems) > _MAX_LISTED_PROBLEMS:
            print(f"  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more", file=sys.stderr)
        print(f"verify: {len(problems)} problem(s) in {root}", file=sys.stderr)
        return 1
    print("verify: OK")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from common.data.fetch import FetchError, fetch

    try:
        result = fetch(Path(args.out), records=args.records, base_url=args.base_url, progress=not args.quiet,
                       workers=args.workers)
    except FetchError as err:
        return _error(err)
    print(f"fetched {result.records} records into {result.out} "
          f"({result.downloaded} files downloaded, {result.kept} already present and verified)")
    print(f"use it with: export PTBXL_DIR={result.out}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    import pandas as pd

    from common.config import ConfigError, load
    from common.data.errors import DataError
    from common.data.metadata import load_metadata
    from common.data.partition import make_partition

    try:
        cfg = load(args.config, args.overrides)
        meta = load_metadata(cfg.data)
        partition = make_partition(meta, cfg.partition)
    except (ConfigError, DataError) as err:
        return _error(err)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(partition.to_json())
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(partition.summary(meta).to_string())
    for reason, count in partition.left_out.items():
        print(f"left out: {count} training-fold records ({reason})")
    print(f"wrote {partition.scheme} partition with {len(partition.sites)} sites to {out}")
    return 0
