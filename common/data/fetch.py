"""Download PTB-XL 1.0.3 from PhysioNet (or a mirror) and check files against SHA256SUMS.txt.

    fetch(Path("data/ptb-xl"), records=1000)      # tables + the first 1000 records of records100/

Downloads are resumable: a file in transit lives as NAME.part and a rerun continues it with an HTTP
Range request; files already present are kept when their SHA256 matches the official SHA256SUMS.txt.
A file whose hash does not match is downloaded once more from scratch, then the fetch stops with an
error. Only the standard library (urllib) is used.

With `records=N` the folder is made self-consistent: ptbxl_database.csv lists only the N fetched rows
(the original is kept as ptbxl_database.full.csv) and SHA256SUMS.txt lists only files that are present
(the original is kept as SHA256SUMS.full.txt).
"""

from __future__ import annotations

import csv
import http.client
import io
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from common.hashing import sha256_file

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://physionet.org/files/ptb-xl/1.0.3/"
SUMS_NAME = "SHA256SUMS.txt"
TABLES = ("ptbxl_database.csv", "scp_statements.csv")
_CHUNK = 1 << 20
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+?)\s*$")
_USER_AGENT = "fedecg-fetch (urllib)"


class FetchError(RuntimeError):
    """A download that failed; the message names the file and what to do."""


@dataclass(frozen=True)
class FetchResult:
    out: Path
    records: int  # records listed in the local ptbxl_database.csv
    downloaded: int  # files transferred in this call
    kept: int  # files already present with a matching hash


def read_sha256sums(path: str | Path) -> dict[str, str]:
    """{relative path: lowercase sha256} from a SHA256SUMS.txt ("<sha256> <path>" or sha256sum's "*path")."""
    path = Path(path)
    sums: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUM_LINE.match(line)
        if not match:
            raise FetchError(f"{path}:{number}: not a '<sha256> <path>' line: {line[:80]!r}")
        sums[match.group(2)] = match.group(1).lower()
    return sums


def verify_checksums(root: str | Path, progress: bool = True) -> tuple[int, list[str]]:
    """Hash every file listed in ROOT/SHA256SUMS.txt; returns (files checked, problems: missing/mismatch)."""
    from tqdm import tqdm

    root = Path(root)
    sums = read_sha256sums(root / SUMS_NAME)
    problems: list[str] = []
    present = {rel: root / rel for rel in sums if (root / rel).is_file()}
    for rel in sums:
        if rel not in present:
            problems.append(f"{rel}: listed in {SUMS_NAME} but missing")
    total = sum(p.stat().st_size for p in present.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking SHA256", disable=not progress) as bar:
        for rel, path in present.items():
            digest = sha256_file(path)
            bar.update(path.stat().st_size)
            if digest != sums[rel]:
                problems.append(f"{rel}: SHA256 mismatch (expected {sums[rel]}, got {digest})")
    return len(sums), problems


# ----------------------------------------------------------------------------------------------------


def _offline_message(base_url: str, reason: object) -> str:
    return (f"cannot reach {base_url} ({reason}). If this machine is offline or PhysioNet is unreachable, "
            "set PTBXL_DIR (or data.root) to an existing copy of PTB-XL instead of fetching")


class _Downloader:
    def __init__(self, base_url: str, out: Path, timeout: float) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.out = out
        self.timeout = timeout

    def url(self, rel: str) -> str:
        return urllib.parse.urljoin(self.base_url, urllib.parse.quote(rel))

    def _transfer(self, rel: str, part: Path) -> None:
        """Bring `part` up to the server's full file, continuing from its current size."""
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url(rel), headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # nothing left to send: the part is complete (the hash decides)
                return
            raise FetchError(f"{rel}: HTTP {err.code} {err.reason} from {self.url(rel)}") from err
        except urllib.error.URLError as err:
            raise FetchError(_offline_message(self.base_url, err.reason)) from err
        except (TimeoutError, ConnectionError) as err:
            raise FetchError(_offline_message(self.base_url, err)) from err
        with response:
            content_range = response.headers.get("Content-Range", "")
            resumed = offset and response.status == 206 and content_range.startswith(f"bytes {offset}-")
            part.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(part, "ab" if resumed else "wb") as handle:  # a server ignoring Range sends it all
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        handle.write(block)
            except (OSError, http.client.HTTPException) as err:
                raise FetchError(f"{rel}: download interrupted ({err}); run the command again to resume") from err

    def fetch(self, rel: str, expected: str | None, local_name: str | None = None) -> bool:
        """Download `rel` to OUT/local_name (default rel); True if transferred, False if already there."""
        dest = self.out / (local_name or rel)
        if expected is not None and dest.is_file() and sha256_file(dest) == expected:
            return False
        part = dest.with_name(dest.name + ".part")
        if expected is None:
            logger.warning("%s is not listed in %s: downloaded without a checksum", rel, SUMS_NAME)
        for attempt in (1, 2):
            self._transfer(rel, part)
            digest = sha256_file(part)
            if expected is None or digest == expected:
                os.replace(part, dest)
                return True
            part.unlink()
            if attempt == 1:
                logger.warning("%s: SHA256 mismatch (got %s, expected %s); downloading it again", rel, digest, expected)
        raise FetchError(
            f"{rel}: corrupted download: SHA256 {digest} twice, but {SUMS_NAME} says {expected}. "
            f"The server {self.base_url} may serve a damaged file; try again later or another --base-url"
        )


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows in ecg_id order) of a PTB-XL database table."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or "ecg_id" not in header or "filename_lr" not in header:
            raise FetchError(f"{path}: not a PTB-XL table (no ecg_id/filename_lr columns)")
        rows = [row for row in reader if row]
    id_col = header.index("ecg_id")
    try:
        rows.sort(key=lambda r: int(float(r[id_col])))
    except (ValueError, IndexError) as err:
        raise FetchError(f"{path}: a row has no integer ecg_id ({err})") from err
    return header, rows


def fetch(
    out: str | Path,
    records: int | None = None,
    base_url: str = DEFAULT_BASE_URL,
    progress: bool = True,
    workers: int = 8,
    timeout: float = 60.0,
) -> FetchResult:
    """Download the tables, SHA256SUMS.txt and the first `records` records (ecg_id order; None: all) of records100/."""
    if records is not None and records <= 0:
        raise FetchError(f"--records {records}: must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = _Downloader(base_url, out, timeout)
    # The official checksum list is the trust anchor: always take the server's current one.
    sums_full = out / "SHA256SUMS.full.txt"
    loader.fetch(SUMS_NAME, None, local_name=sums_full.name)
    sums = read_sha256sums(sums_full)
    transferred = _fetch_tables(loader, out, sums)
    header, rows = _read_rows(out / "ptbxl_database.full.csv")
    selected = rows if records is None else rows[:records]
    files = _record_files(header, selected, sums, base_url)
    transferred += _fetch_records(loader, files, sums, workers, progress)
    _write_local_index(out, header, selected, len(rows), sums, files)
    return FetchResult(out=out, records=len(selected), downloaded=sum(transferred), kept=transferred.count(False))


def _fetch_tables(loader: _Downloader, out: Path, sums: dict[str, str]) -> list[bool]:
    """The two tables (the database as ptbxl_database.full.csv); per table, True if it was transferred."""
    official_table, full_table = out / "ptbxl_database.csv", out / "ptbxl_database.full.csv"
    if not full_table.exists() and official_table.is_file() and sha256_file(official_table) == sums.get(official_table.name):
        os.replace(official_table, full_table)  # a previous complete fetch: reuse its table
    return [loader.fetch(name, sums.get(name), local_name=full_table.name if name == official_table.name else name)
            for name in TABLES]


def _record_files(header: list[str], selected: list[list[str]], sums: dict[str, str], base_url: str) -> list[str]:
    """The .hea/.dat files of the selected rows, each of which the checksum list must name."""
    lr_col = header.index("filename_lr")
    files = [f"{row[lr_col]}{ext}" for row in selected for ext in (".hea", ".dat")]
    unlisted = [f for f in files if f not in sums]
    if unlisted:
        raise FetchError(f"{len(unlisted)} record file(s) are not listed in the server's {SUMS_NAME}, "
                         f"e.g. {unlisted[:3]}; the mirror {base_url} is incomplete")
    return files


def _fetch_records(loader: _Downloader, files: list[str], sums: dict[str, str], workers: int,
                   progress: bool) -> list[bool]:
    """Download `files` in parallel, stopping at the first failure; per file, True if it was transferred."""
    from tqdm import tqdm

    transferred = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(files), desc="downloading records100", unit="file", disable=not progress) as bar:
        pending = {pool.submit(loader.fetch, rel, sums[rel]) for rel in files}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                bar.update(1)
                transferred.append(future.result())
    return transferred


def _write_local_index(out: Path, header: list[str], selected: list[list[str]], total: int,
                       sums: dict[str, str], files: list[str]) -> None:
    """ptbxl_database.csv and SHA256SUMS.txt describing exactly what is in OUT."""
    table, sums_path = out / "ptbxl_database.csv", out / SUMS_NAME
    if len(selected) == total:  # everything fetched: the official files are the index
        os.replace(out / "ptbxl_database.full.csv", table)
        os.replace(out / "SHA256SUMS.full.txt", sums_path)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(selected)
    table.write_text(buffer.getvalue(), encoding="utf-8")
    # Only files present here; the subset table is new, so the full one stands in for it.
    listed = ["scp_statements.csv", *files]
    lines = [f"{sums[rel]} {rel}" for rel in listed if rel in sums]
    if "ptbxl_database.csv" in sums:
        lines.insert(0, f"{sums['ptbxl_database.csv']} ptbxl_database.full.csv")
    sums_path.write_text("\n".join(lines) + "\n")
