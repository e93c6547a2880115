"""The on-disk cache of preprocessed records: a key over the inputs' identity, atomic .npz files.

Bump PREPROCESSING_VERSION when preprocessing changes what the arrays contain: it is part of every key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import DataConfig
from common.data.records import RecordChoice
from common.hashing import sha256_file

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1


# Files changed less than this long ago also contribute their content hash: file times come from a
# coarse kernel clock (one tick is 1-10 ms; some network filesystems keep whole seconds), so two writes
# within one tick can leave identical times (git's "racy clean" problem). Older files change times on
# any later write, so size + times + inode identify their contents.
_RACY_SECONDS = 3.0


def _stat_token(path: str, now: float) -> str:
    # ctime is set by the kernel on every write and cannot be set back by tools (unlike mtime), so a
    # record rewritten in place, even with its size and mtime restored, gets a new token (git's index
    # uses the same test). A false miss (e.g. after chmod or a copy) only costs a rebuild.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent"
    token = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
    if max(st.st_mtime, st.st_ctime) > now - _RACY_SECONDS:
        token += ":" + sha256_file(path)
    return token


def cache_key(root: Path, meta: pd.DataFrame, choices: Sequence[RecordChoice | None], cfg: DataConfig) -> str:
    """Hash of the inputs' contents/identity and of the preprocessing parameters of this selection."""
    now = time.time()
    digest = hashlib.sha256()
    digest.update(f"v{PREPROCESSING_VERSION}|rate={cfg.sampling_rate}|bad={cfg.on_bad_record}\n".encode())
    for name in ("ptbxl_database.csv", "scp_statements.csv", "SHA256SUMS.txt"):
        path = root / name
        digest.update(f"{name}={sha256_file(path) if path.is_file() else 'absent'}\n".encode())
    for ecg_id, choice in zip(meta.index.tolist(), choices):
        if choice is None:
            digest.update(f"{ecg_id}:none\n".encode())
            continue
        rel = choice[1]
        tokens = [_stat_token(f"{root}/{rel}{ext}", now) for ext in (".hea", ".dat")]
        digest.update(f"{ecg_id}:{rel}:{tokens[0]}:{tokens[1]}\n".encode())
    return digest.hexdigest()


_CACHED_ARRAYS = ("ecg_ids", "signals", "skipped_ids")


def cache_path(cfg: DataConfig, key: str) -> Path:
    return Path(cfg.cache_dir).expanduser() / f"ptbxl-{key[:24]}.npz"


def load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return {name: data[name] for name in _CACHED_ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # A broken cache file is rebuilt, never trusted.
        logger.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, err)
        return None


def save_cache(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")  # unique per writer
    try:
        with os.fdopen(handle_fd, "wb") as handle:
            np.savez(handle, key=np.array(key), **arrays)
        os.replace(partial, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise

