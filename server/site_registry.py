"""The SuperLink operator's record of which authenticated node is which site, read by the ServerApp.

Under SuperNode authentication Flower binds a node id to the public key registered for it, and every Fleet
request is signed by that key; the `site` a SuperNode names in its node config is still its operator's word.
The registry (JSON, as the loopback deployment writes it in RUN/.flwr/superlink/site_registry.json):

    {"sites": [{"name": "iid-0", "node-id": 1234, "site": 0, "public-key": "ecdsa-sha2-nistp384 ..."}, ...]}

names, for each site, the node id `flwr supernode register` printed for its key. Only `name` and `node-id`
are read here. Given to the ServerApp (run config `site-registry`, an absolute path), it seeds the privacy
ledger's site -> node bindings, so a reply that claims a site other than its node's is refused (server/strategy.py).
"""

from __future__ import annotations

import json
from pathlib import Path


class RegistryError(ValueError):
    """A site registry that cannot be read, or that binds one name or one node twice."""


def load_site_registry(path: str | Path) -> dict[str, int]:
    """Site name -> registered node id; a malformed registry is an error, never a partial mapping."""
    try:
        entries = json.loads(Path(path).read_text())["sites"]
        pairs = [(str(entry["name"]), int(entry["node-id"])) for entry in entries]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise RegistryError(f"{path}: not a site registry ({err})") from err
    if not pairs:
        raise RegistryError(f"{path}: the site registry names no site")
    names, nodes = [name for name, _ in pairs], [node for _, node in pairs]
    if len(set(names)) != len(names) or len(set(nodes)) != len(nodes):
        raise RegistryError(f"{path}: a site name or a node id appears twice")
    return dict(pairs)
