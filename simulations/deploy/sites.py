"""Which SuperNode may act as which site: one key pair per site, its public key registered with the SuperLink.

Under `--enable-supernode-auth`, Flower 1.42 assigns a node id when the operator registers a public key
(`flwr supernode register KEY.pub`), finds that id by the key when a SuperNode activates, and refuses any
Fleet request whose node id is not the one of the key that signed it. So a node id stands for one key,
across reconnects, for as long as the SuperLink's state lives (in memory unless `--database FILE`).
Flower does not check the `site` a SuperNode names in its own node config. The registry written here is
the SuperLink operator's record of which node id is which site; the loopback writes every SuperNode's
node config from it and gives it to the ServerApp (run config `site-registry`, server/site_registry.py),
which refuses a node reporting another site's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.config import Config
from simulations.deploy.certs import SiteKey, make_site_key
from simulations.deploy.flower import DeploymentError, flwr_json
from simulations.deploy.supervisor import Supervisor

REGISTRY = "site_registry.json"


@dataclass(frozen=True)
class RegisteredSite:
    index: int  # the node config's `site`
    name: str  # the partition's name for it, as the server's privacy ledger knows the site
    node_id: int  # Flower's node id for this site's key
    public_key: str  # OpenSSH text, as registered


def site_names(cfg: Config) -> list[str]:
    """The partition's site names, in node-config `site` order (what the ClientApps will report)."""
    from common.data.metadata import load_metadata
    from common.data.partition import make_partition

    return [site.name for site in make_partition(load_metadata(cfg.data), cfg.partition).sites]


def make_site_keys(directory: Path, count: int) -> list[SiteKey]:
    """DIR/site-I/site-I.{key,pub}: one folder per site, as each would keep its key on its own machine."""
    return [make_site_key(directory / f"site-{i}", f"site-{i}") for i in range(count)]


def register_sites(
    supervisor: Supervisor, flwr: str, connection: str, names: list[str], keys: list[SiteKey], deadline: float
) -> list[RegisteredSite]:
    """`flwr supernode register` each site's public key; the SuperLink answers with the node id it bound to it."""
    if len(names) != len(keys):
        raise ValueError(f"{len(names)} site names but {len(keys)} keys")
    sites = []
    for index, (name, key) in enumerate(zip(names, keys)):
        answer = flwr_json(
            supervisor, f"register-site-{index}",
            [flwr, "supernode", "register", str(key.public), connection, "--name", f"site-{index}"], deadline,
        )
        try:
            node_id = int(answer["node-id"])
        except (KeyError, TypeError, ValueError) as err:
            raise DeploymentError(f"`flwr supernode register` gave no node id for site {index}: {answer}") from err
        sites.append(RegisteredSite(index, name, node_id, key.public.read_text().strip()))
    if len({s.node_id for s in sites}) != len(sites):
        raise DeploymentError(f"two sites were given one node id: {[s.node_id for s in sites]}")
    return sites


def write_registry(path: Path, sites: list[RegisteredSite]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"site": s.index, "name": s.name, "node-id": s.node_id, "public-key": s.public_key} for s in sites]
    path.write_text(json.dumps({"sites": entries}, indent=2) + "\n")
    return path


def read_registry(path: Path) -> list[RegisteredSite]:
    """The registry `write_registry` wrote; a malformed one is an error, never a partial list."""
    try:
        entries = json.loads(Path(path).read_text())["sites"]
        sites = [RegisteredSite(int(e["site"]), str(e["name"]), int(e["node-id"]), str(e["public-key"])) for e in entries]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DeploymentError(f"{path}: not a site registry ({err})") from err
    for field_name in ("index", "name", "node_id"):
        values = [getattr(s, field_name) for s in sites]
        if len(set(values)) != len(values):
            raise DeploymentError(f"{path}: two sites share a {field_name.replace('_', ' ')}")
    return sites
