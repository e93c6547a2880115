"""Run the fedecg Flower apps the way a deployment does, on one machine over loopback.

Two modes, both through Flower's own command line tools:

    # a SuperLink and one SuperNode per site, then `flwr run APP fedecg-loopback`; TLS from a private CA
    # made in the run (or --certs DIR from `fedecg deploy certs`), only registered SuperNode keys may join,
    # and SecAgg+ on (--no-secure-aggregation: the server sees every update); prints the epsilon table
    python -m simulations.deploy_loopback --config configs/loopback.yaml --data-root ../shared/ptb-xl

    # `flwr run . local-simulation`: the SuperLink that `flwr run` starts itself, in simulation mode
    python -m simulations.deploy_loopback --local-simulation --config configs/loopback.yaml --data-root ../shared/ptb-xl

Every process started here, and every process those start, is stopped by process id at the end, also
when the run fails or times out (simulations/deploy/supervisor.py); the runs are in simulations/deploy/runs.py.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from common.config import ConfigError, load
from simulations.deploy.flower import DeploymentError
from simulations.deploy.runs import (
    PROJECT_ROOT,
    run_flwr_local_simulation,
    run_loopback_deployment,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deploy_loopback",
        description="Run the fedecg Flower apps on Flower's deployment engine over loopback "
        "(SuperLink + one SuperNode per site), or with `flwr run . local-simulation`.",
    )
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "loopback.yaml"), help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--data-root", help="PTB-XL folder (default: data.root, else $PTBXL_DIR)")
    parser.add_argument("--out", help="run directory (default: output.dir/output.name-MODE-TIMESTAMP)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the deployment run in --out from its latest checkpoint (same --config and --set)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take")
    parser.add_argument("--local-simulation", action="store_true",
                        help="use `flwr run . local-simulation` instead of a SuperLink and SuperNodes")
    parser.add_argument("--project", default=str(PROJECT_ROOT), help="the Flower app folder (holds pyproject.toml)")
    parser.add_argument("--certs", metavar="DIR",
                        help="TLS files from `fedecg deploy certs --out DIR` (default: a new CA in the run directory)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication: any local process may join as a site (tests only)")
    parser.add_argument("--no-secure-aggregation", dest="secure_aggregation", action="store_const", const=False,
                        help="aggregate in the clear: the server sees every site's update (default: SecAgg+; "
                        "--resume keeps the run's own)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("deploy_loopback: error: --timeout must be positive", file=sys.stderr)
        return 2
    if args.resume and (args.local_simulation or not args.out):
        print("deploy_loopback: error: --resume continues a deployment: give its --out RUN_DIR", file=sys.stderr)
        return 2
    if args.local_simulation and (args.certs or args.insecure):
        print("deploy_loopback: error: --certs and --insecure apply to the deployment, not --local-simulation",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.local_simulation and args.secure_aggregation is False:
        print("deploy_loopback: error: --no-secure-aggregation applies to the deployment; --local-simulation follows "
              "federation.secure_aggregation in the config", file=sys.stderr)
        return 2
    security = {} if args.local_simulation else {"certs": args.certs, "insecure": args.insecure, "resume": args.resume,
                                                 "secure_aggregation": args.secure_aggregation}
    runner = run_flwr_local_simulation if args.local_simulation else run_loopback_deployment
    # A plain SIGTERM would end Python without running the clean-up; as SystemExit it unwinds through it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = runner(
            args.config, args.overrides, data_root=args.data_root, run_dir=args.out, project=args.project,
            timeout_s=args.timeout, progress=not args.quiet, **security,
        )
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"deploy_loopback: error: {err}", file=sys.stderr)
        return 2
    except DeploymentError as err:
        print(f"deploy_loopback: the run failed: {err}", file=sys.stderr)
        return 1
    aggregation = "" if args.local_simulation else (
        ", SecAgg+" if load(result.run_dir / "config.yaml").federation.secure_aggregation else ", PLAIN aggregation")
    table = result.run_dir / "epsilon_table.txt"
    if table.is_file():
        print(table.read_text().rstrip())
    print(
        f"{result.mode} ({result.security}{aggregation}): {result.num_sites} sites, run {result.status} in {result.seconds:.1f}s; "
        f"{len(result.processes)} processes started and stopped\nrun directory: {result.run_dir}\n"
        f"logs: {result.log_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
