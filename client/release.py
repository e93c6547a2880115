"""A site's last DP release of each run, kept so that a round the server asks for again costs no new budget.

When the server dies after the sites trained a round but before it checkpointed, the resumed server sends
that round again from the same checkpoint: the same run, round and global weights. Training it again would
spend the budget twice for one round (and a run planned to the last step would end early). The weights the
site released for it are a DP output already paid for in the ledger, so sending them again is
post-processing. Any other request (other weights, another round) trains and pays as usual.

Only for aggregation in the clear: under SecAgg+ a second masking session over the same update, with a
different set of sites claimed to have dropped out, could let the server unmask it, so the site trains anew.

    <state-dir>/<site>-<fingerprint>/released/<run-key>.safetensors   the weights; metadata: round, digest, metrics
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: which global weights a round started from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _path(directory: Path, run_key: str) -> Path:
    return Path(directory) / "released" / f"{run_key}.safetensors"


def save_release(directory: Path, run_key: str, server_round: int, start_digest: str,
                 state: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
    """Replace the run's kept release with this round's (written whole, then renamed into place)."""
    path = _path(directory, run_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({name: t.contiguous() for name, t in state.items()}, str(tmp),
              metadata={"round": str(server_round), "start-digest": start_digest, "metrics": json.dumps(metrics)})
    os.replace(tmp, path)


def kept_release(directory: Path, run_key: str, server_round: int,
                 start_digest: str) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
    """The weights and public metrics released for exactly this run, round and start, or None."""
    path = _path(directory, run_key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("round") != str(server_round) or meta.get("start-digest") != start_digest:
            return None
        return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(meta["metrics"])
