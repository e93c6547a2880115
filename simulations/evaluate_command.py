"""`fedecg evaluate`: fidelity, clinical coherence, memorization and utility of synthetic ECGs.

    fedecg evaluate --bundle BUNDLE --data REAL_DIR [--quick] --out DIR
    fedecg evaluate --synthetic SYN_DIR --data REAL_DIR [--quick] --out DIR
    fedecg evaluate --real-vs-real --data REAL_DIR [--quick] --out DIR

Writes DIR/evaluation.json (schema: common/evaluation/schema.py), DIR/plots/*.png and DIR/report.md.
Settings come from the `evaluation` section of --config (in bundle mode, default: the bundle's own
config) with --set overrides; data.cache_dir (trained classifiers and record caches) and
data.on_bad_record are honoured too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import Config, ConfigError, from_dict, load, to_dict

_ALLOWED_SET = ("evaluation.", "data.cache_dir=", "data.on_bad_record=")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate synthetic ECGs against real ones (evaluation.json + report)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="release bundle, checkpoint or run directory: samples the synthetic set itself")
    src.add_argument("--synthetic", metavar="SYN_DIR", help="PTB-XL-format folder of synthetic records")
    src.add_argument("--real-vs-real", action="store_true",
                     help="no generator: half of the real training folds plays the synthetic set (reference values)")
    p.add_argument("--data", required=True, metavar="REAL_DIR", help="PTB-XL folder of real records")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a laptop CPU")
    p.add_argument("--config", help="YAML config whose evaluation section to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluation.KEY=VALUE",
                   help="override an evaluation setting (or data.cache_dir / data.on_bad_record); repeatable")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice); 1 is much faster on a machine busy with other work")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)


def _config(args: argparse.Namespace) -> Config:
    for text in args.overrides:
        if not text.strip().startswith(_ALLOWED_SET):
            raise ConfigError(f"--set {text}: evaluate accepts evaluation.* and data.cache_dir / data.on_bad_record only")
    if args.config:
        return load(args.config, args.overrides)
    if args.bundle:
        from common.bundle import load_generator

        base = to_dict(load_generator(args.bundle).cfg)
        return from_dict({"evaluation": base["evaluation"], "data": {"cache_dir": base["data"]["cache_dir"]}},
                         args.overrides, source=f"{args.bundle} (config)")
    return from_dict({}, args.overrides, source="defaults")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.evaluation import pipeline

    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected 0 (torch's default) or a positive count")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _config(args)
    real = Path(args.data)
    if not (real / "ptbxl_database.csv").is_file():
        raise FileNotFoundError(f"--data {real}: no ptbxl_database.csv (expected a PTB-XL-format folder)")
    if args.synthetic and not (Path(args.synthetic) / "ptbxl_database.csv").is_file():
        raise FileNotFoundError(f"--synthetic {args.synthetic}: no ptbxl_database.csv (expected a PTB-XL-format folder)")
    settings = pipeline.resolve_settings(cfg.evaluation, quick=args.quick or cfg.evaluation.quick)
    progress = not args.quiet
    out = Path(args.out)
    if args.bundle:
        data = pipeline.prepare_bundle(args.bundle, real, out, cfg, settings, progress)
    elif args.synthetic:
        data = pipeline.prepare_folders(real, args.synthetic, cfg, settings, progress)
    else:
        data = pipeline.prepare_real_vs_real(real, cfg, settings, progress)
    result = pipeline.run(data, settings, out, cfg.data.cache_dir, progress)
    f, u, m = result["fidelity"], result["utility"], result["memorization"]
    print(f"inter-lead correlation error {f['interlead_corr_error']:.4f} (real reference "
          f"{_num(f['interlead_corr_error_real_reference'])}); TRTR {_num(u['trtr']['macro_auroc_superclasses'])}, "
          f"TSTR {_num(u['tstr']['macro_auroc_superclasses'])} macro AUROC (superclasses); "
          f"DCR share {m['dcr_share_closer_to_train']:.3f}"
          + (f"; MIA AUC {m['mia']['mia_auc']:.3f}" if m.get("mia") else ""))
    print(f"wrote {out / 'evaluation.json'}, {out / 'report.md'} and {len(result['plots'])} plots")
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
