"""`fedecg deploy`: credentials for a real deployment.

    fedecg deploy certs --out DIR [--host NAME ...]     # on the SuperLink host: private CA + server certificate
    fedecg deploy site-key --out DIR --site NAME        # at each site: its SuperNode key pair
"""

from __future__ import annotations

import argparse

from simulations.deploy.certs import (
    CA_CERT,
    CA_KEY,
    make_site_key,
    make_tls_certificates,
)


def cmd_certs(args: argparse.Namespace) -> int:
    files = make_tls_certificates(args.out, args.hosts, days=args.days)
    out = files.ca_cert.parent
    names = ", ".join(["127.0.0.1", "localhost", *args.hosts])
    print(
        f"wrote {out}: {CA_CERT} (give to every SuperNode and `flwr` user), {files.server_cert.name} and "
        f"{files.server_key.name} (stay on the SuperLink host), {CA_KEY} (keep offline; signs new certificates)\n"
        f"the server certificate is valid for: {names}"
    )
    return 0


def cmd_site_key(args: argparse.Namespace) -> int:
    key = make_site_key(args.out, args.site)
    print(
        f"wrote {key.private} (stays at this site: flower-supernode --auth-supernode-private-key) and "
        f"{key.public} (send to the SuperLink operator: flwr supernode register {key.public.name})"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("deploy", help="credentials for a deployment on Flower's SuperLink and SuperNodes")
    dsub = p.add_subparsers(dest="deploy_command", required=True)
    c = dsub.add_parser("certs", help="a private CA and the SuperLink's TLS certificate (keys written 0600)")
    c.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key (never overwritten)")
    c.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                   help="a DNS name or IP address SuperNodes use to reach the SuperLink; repeatable "
                        "(127.0.0.1 and localhost are always included)")
    c.add_argument("--days", type=int, default=825, help="validity of the CA and server certificates")
    c.set_defaults(func=cmd_certs)
    k = dsub.add_parser("site-key", help="one site's SuperNode authentication key pair (P-384, OpenSSH format)")
    k.add_argument("--out", required=True, help="folder for SITE.key (0600) and SITE.pub")
    k.add_argument("--site", required=True, help="a name for the key files, e.g. the hospital's")
    k.set_defaults(func=cmd_site_key)
