"""The `fedecg` command line: data, train, simulate, sample, export, privacy, evaluate, deploy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from common.config import ConfigError, RunSpec, load
from common.run_dir import default_run_dir


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from simulations.central import run_central

    kind = "pretrain" if args.command == "pretrain" else "central"
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"--resume {out}: no config.yaml (not a fedecg run directory)")
        cfg = load(out / "config.yaml", args.overrides)
    elif args.config:
        cfg = load(args.config, args.overrides)
        out = Path(args.out) if args.out else default_run_dir(cfg, kind)
    else:
        raise ConfigError(f"{args.command} needs --config CFG (or --resume RUN_DIR)")
    run_central(cfg, out, progress=not args.quiet, pool="public" if kind == "pretrain" else "training",
                resume=bool(args.resume))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    if args.resume:
        run_dir = Path(args.resume)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml (not a fedecg run directory)")
        spec = RunSpec(str(config_path), tuple(args.overrides), str(run_dir), resume=True, until_round=args.until_round)
    else:
        if not args.config:
            raise ConfigError("simulate needs --config CFG (or --resume RUN_DIR)")
        cfg = load(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg)
        spec = RunSpec(args.config, tuple(args.overrides), str(run_dir), until_round=args.until_round)
    simulate(spec)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import pandas as pd

    from common.bundle import load_generator
    from common.data.metadata import read_metadata_table
    from common.generate import sample_like, sample_records
    from common.scp import SCP_CODES

    source = args.bundle or args.checkpoint
    if not source:
        raise ConfigError("sample needs --bundle BUNDLE or --checkpoint PATH")
    gen = load_generator(source)
    if args.guidance is not None:  # sampling is not training: the same weights under another guidance scale
        if args.guidance < 0:
            raise ConfigError(f"--guidance must be >= 0, got {args.guidance}")
        diffusion = dataclasses.replace(gen.cfg.diffusion, guidance_scale=args.guidance)
        gen = dataclasses.replace(gen, cfg=dataclasses.replace(gen.cfg, diffusion=diffusion))
    out = Path(args.out)
    if args.like:
        meta = read_metadata_table(Path(args.like))
        if args.n:
            meta = meta.iloc[: args.n]
        statements = Path(args.like).parent / "scp_statements.csv"
        sample_like(gen, meta, SCP_CODES, out, seed=args.seed, progress=not args.quiet, scp_statements=statements)
        print(f"wrote {len(meta)} synthetic records in PTB-XL format to {out}")
    else:
        table = sample_records(
            gen, SCP_CODES, out, n=args.n or 4, labels=args.labels, age=args.age, sex=args.sex,
            height=args.height, weight=args.weight, seed=args.seed, progress=not args.quiet,
        )
        print(f"wrote {len(table)} records, conditions.csv and samples.png to {out}")
    del pd
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from simulations.export import export_bundle

    bundle = export_bundle(Path(args.run), Path(args.out), evaluation=Path(args.evaluation) if args.evaluation else None)
    print(f"bundle: {bundle}")
    return 0


def cmd_privacy_verify(args: argparse.Namespace) -> int:
    from common.bundle import BundleError, load_generator, verify_bundle
    from common.privacy import verify_certificate, verify_release

    path = Path(args.path)
    problems: list[str] = []
    if (path / "manifest.json").is_file():
        problems += verify_bundle(path)
    cert_path = path / "privacy.json" if path.is_dir() else path
    if not cert_path.is_file():
        print(f"FAIL: no privacy.json in {path}", file=sys.stderr)
        return 1
    certificate = json.loads(cert_path.read_text())
    problems += verify_release(path) if path.is_dir() else verify_certificate(certificate)
    if not problems and path.is_dir():
        try:
            load_generator(path)  # the weights fit the certified config's model
        except BundleError as err:
            problems.append(str(err))
    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=sys.stderr)
        return 1
    rel = certificate["release"]
    print(f"OK: {len(certificate['sites'])} sites recomputed from the embedded config ({certificate['accountant']})")
    for site in certificate["sites"]:
        print(f"  {site['site']}: epsilon {site['epsilon']:.4f} replace-one, {site['epsilon_add_remove']:.4f} add/remove "
              f"(target {site['target_epsilon']}), {site['steps']} of {site['planned_steps']} planned steps, N={site['num_records']}")
    print(f"release: ({rel['epsilon']:.4f}, {rel['delta']:g})-DP per {rel['unit']}, {rel['neighbouring_relation']} "
          f"(add/remove: {rel['epsilon_add_remove']:.4f})")
    expert = certificate.get("public_expert")
    if expert:
        rhythm = f", rhythm table sha256 {expert['rhythm_sha256'][:16]}..." if expert.get("rhythm_sha256") else ""
        print(f"public expert (sampling steps t >= {expert['answers_from_step']}): {expert['trained_on']}, weights "
              f"sha256 {expert['weights_sha256'][:16]}...{rhythm}, no site's record")
    carried = (" and public expert (with its rhythm table)" if expert.get("rhythm_sha256") else " and public expert") \
        if expert else ""
    print(f"verified: arithmetic, the plan from the config, the config, weights{carried} named by the certificate; "
          "not verifiable from the bundle: that the weights were trained as certified")
    return 0


def cmd_privacy_ledger(args: argparse.Namespace) -> int:
    from common.privacy.ledger import ledgers_under

    ledgers = ledgers_under(args.dir)
    if not ledgers:
        print(f"no site ledgers under {args.dir}")
        return 0
    for ledger in ledgers:
        if args.action == "reset":
            ledger.reset(reason=args.reason)
            print(f"reset {ledger.site} ({ledger.directory}): its spend is forgotten and its secret key replaced")
        else:
            summary = ledger.summary()
            print(f"{summary['site']}: {summary['runs']} runs, {summary['steps']} steps, history {summary['history']}, "
                  f"{summary['resets']} resets ({summary['directory']})")
    return 0


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    for name, help_text, kind, unfinished in (
        ("train", "train one model centrally on all training folds (the baseline)", "central", "non-DP run"),
        ("pretrain", "train a base model without DP on the public pool (partition.public_sites)", "pretrain", "pretraining"),
    ):
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p, required=False)
        p.add_argument("--out", help=f"run directory (default: output.dir/output.name-{kind}-TIMESTAMP)")
        p.add_argument("--resume", metavar="RUN_DIR", help=f"continue an unfinished {unfinished} from its last logged step")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("simulate", help="run the federation on Flower's simulation engine")
    _add_config_args(p, required=False)
    p.add_argument("--out", help="run directory (default: output.dir/output.name-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--until-round", type=int, default=0, help="stop after this round (resume later)")
    p.set_defaults(func=cmd_simulate)


def _add_sample_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate 12-lead ECGs as WFDB records")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="release bundle")
    src.add_argument("--checkpoint", help="checkpoint or run directory")
    p.add_argument("--n", type=int, default=0, help="records to generate (with --like: first N rows)")
    p.add_argument("--labels", help="comma-separated SCP statements, e.g. NORM or IMI,LVH")
    p.add_argument("--age", type=float)
    p.add_argument("--sex", choices=["male", "female"])
    p.add_argument("--height", type=float, help="cm")
    p.add_argument("--weight", type=float, help="kg")
    p.add_argument("--like", metavar="METADATA.csv", help="one record per row of a PTB-XL-format table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the bundle's)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)


def _add_release_commands(sub: argparse._SubParsersAction) -> None:
    from simulations import audit_command

    p = sub.add_parser("export", help="write a release bundle from a run directory")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--evaluation", help="evaluation.json to include, labelled as outside the DP guarantee (default: none)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("privacy", help="privacy certificate tools")
    psub = p.add_subparsers(dest="privacy_command", required=True)
    v = psub.add_parser("verify", help="recompute epsilon from a run's or bundle's certificate")
    v.add_argument("path", metavar="RUN_OR_BUNDLE")
    v.set_defaults(func=cmd_privacy_verify)
    led = psub.add_parser("ledger", help="show or reset the site ledgers under a state directory")
    led.add_argument("action", choices=["show", "reset"])
    led.add_argument("--dir", default=".fedecg/sites", help="the sites' state directory (federation.site_state_dir)")
    led.add_argument("--reason", default="reset by the operator", help="recorded in the ledger with a reset")
    led.set_defaults(func=cmd_privacy_ledger)
    audit_command.register(psub, _add_config_args)


def build_parser() -> argparse.ArgumentParser:
    from simulations import data_commands, evaluate_command
    from simulations.deploy import command as deploy_command

    parser = argparse.ArgumentParser(prog="fedecg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    data_commands.register(sub)
    evaluate_command.register(sub)
    _add_training_commands(sub)
    _add_sample_command(sub)
    _add_release_commands(sub)
    deploy_command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Third-party libraries (Flower's database layer, Ray) log chatty INFO lines; ours stay visible.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("fedecg", "common", "simulations"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"fedecg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
