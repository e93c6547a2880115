"""`fetch` against a local PhysioNet-layout mirror on 127.0.0.1: subsets, resume, corruption, offline."""

from __future__ import annotations

import csv
import logging
import socket
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data.fetch import FetchError, fetch, read_sha256sums, verify_checksums
from common.data.dataset import load_dataset
from common.data.verify import check_structure
from tests.fixtures_ptbxl import MirrorServer, TinyPtbxl, build_mirror, records_requested


@pytest.fixture
def mirror(tiny_ptbxl: TinyPtbxl, tmp_path: Path):
    root = build_mirror(tiny_ptbxl.root, tmp_path / "mirror", ecg_ids=[r["ecg_id"] for r in tiny_ptbxl.rows])
    with MirrorServer(root) as server:
        yield server


def table_ids(path: Path) -> list[int]:
    with path.open(newline="") as handle:
        return [int(row["ecg_id"]) for row in csv.DictReader(handle)]


def test_fetch_first_records_gives_a_self_consistent_folder(mirror, tiny_ptbxl, tmp_path):
    out = tmp_path / "out"
    result = fetch(out, records=5, base_url=mirror.base_url, progress=False)
    assert result.records == 5 and result.downloaded == 2 + 10 and result.kept == 0
    assert table_ids(out / "ptbxl_database.csv") == [1, 2, 3, 4, 5]
    assert (out / "ptbxl_database.full.csv").read_bytes() == (mirror.root / "ptbxl_database.csv").read_bytes()
    assert sorted(p.name for p in out.glob("records100/*/*")) == sorted(
        f"{i:05d}_lr{ext}" for i in range(1, 6) for ext in (".hea", ".dat"))
    assert not list(out.rglob("*.part"))
    checked, problems = verify_checksums(out, progress=False)
    assert problems == [] and checked == 1 + 1 + 10  # full table, scp_statements, 10 record files
    assert check_structure(out)[1] == []
    ds = load_dataset(DataConfig(root=str(out), cache_dir=str(tmp_path / "cache")), progress=False)
    assert ds.ecg_ids.tolist() == [1, 2, 3, 4, 5]
    for i, ecg_id in enumerate(ds.ecg_ids):
        np.testing.assert_allclose(ds.signals[i], tiny_ptbxl.signals8[int(ecg_id)], atol=1e-6)


def test_fetch_everything_keeps_the_official_files(mirror, tmp_path):
    out = tmp_path / "out"
    result = fetch(out, base_url=mirror.base_url, progress=False, workers=3)
    assert result.records == 40
    assert (out / "ptbxl_database.csv").read_bytes() == (mirror.root / "ptbxl_database.csv").read_bytes()
    assert (out / "SHA256SUMS.txt").read_bytes() == (mirror.root / "SHA256SUMS.txt").read_bytes()
    assert not (out / "ptbxl_database.full.csv").exists()
    assert verify_checksums(out, progress=False)[1] == []
    # A rerun transfers no records and keeps the folder as it is.
    mirror.requests.clear()
    again = fetch(out, base_url=mirror.base_url, progress=False)
    assert again.downloaded == 0 and again.kept == 2 + 80
    assert list(records_requested(mirror)) == []
    assert (out / "ptbxl_database.csv").read_bytes() == (mirror.root / "ptbxl_database.csv").read_bytes()


def test_interrupted_download_resumes_with_a_range_request(mirror, tmp_path):
    out = tmp_path / "out"
    rel = "records100/00000/00002_lr.dat"
    part = out / (rel + ".part")
    part.parent.mkdir(parents=True)
    original = (mirror.root / rel).read_bytes()
    part.write_bytes(original[:1000])  # what an interrupted run leaves behind
    fetch(out, records=3, base_url=mirror.base_url, progress=False)
    assert [r for r in mirror.requests if r[0] == rel] == [(rel, "bytes=1000-")]
    assert (out / rel).read_bytes() == original and not part.exists()


def test_a_bad_partial_file_is_detected_and_fetched_again(mirror, tmp_path):
    out = tmp_path / "out"
    rel = "records100/00000/00002_lr.dat"
    part = out / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\x00" * 1000)  # a prefix that is not the file's
    fetch(out, records=3, base_url=mirror.base_url, progress=False)
    assert [r for r in mirror.requests if r[0] == rel] == [(rel, "bytes=1000-"), (rel, None)]
    assert (out / rel).read_bytes() == (mirror.root / rel).read_bytes()


def test_corrupted_transfer_is_downloaded_again_once(mirror, tmp_path, caplog):
    rel = "records100/00000/00003_lr.dat"
    mirror.corrupt_once.add(rel)
    with caplog.at_level(logging.WARNING, logger="common.data.fetch"):
        fetch(tmp_path / "out", records=3, base_url=mirror.base_url, progress=False)
    assert [r for r in mirror.requests if r[0] == rel] == [(rel, None), (rel, None)]
    assert f"{rel}: SHA256 mismatch" in caplog.text
    assert (tmp_path / "out" / rel).read_bytes() == (mirror.root / rel).read_bytes()


def test_persistently_corrupted_file_is_a_clear_error(mirror, tmp_path):
    rel = "records100/00000/00003_lr.dat"
    mirror.corrupt_always.add(rel)
    out = tmp_path / "out"
    with pytest.raises(FetchError, match=rf"{rel}: corrupted download: SHA256 [0-9a-f]{{64}} twice, but SHA256SUMS.txt says"):
        fetch(out, records=3, base_url=mirror.base_url, progress=False)
    assert not (out / rel).exists() and not (out / (rel + ".part")).exists()


def test_a_damaged_local_file_is_replaced_on_rerun(mirror, tmp_path):
    out = tmp_path / "out"
    fetch(out, records=2, base_url=mirror.base_url, progress=False)
    rel = "records100/00000/00001_lr.dat"
    (out / rel).write_bytes(b"garbage")
    assert any("SHA256 mismatch" in p for p in verify_checksums(out, progress=False)[1])
    mirror.requests.clear()
    result = fetch(out, records=2, base_url=mirror.base_url, progress=False)
    assert list(records_requested(mirror)) == [rel] and result.downloaded == 1
    assert verify_checksums(out, progress=False)[1] == []


def test_missing_file_on_the_server_names_it(mirror, tmp_path):
    (mirror.root / "records100/00000/00002_lr.hea").unlink()
    with pytest.raises(FetchError, match=r"records100/00000/00002_lr\.hea: HTTP 404"):
        fetch(tmp_path / "out", records=3, base_url=mirror.base_url, progress=False)


def test_record_missing_from_the_checksum_list_is_refused(mirror, tmp_path):
    sums = mirror.root / "SHA256SUMS.txt"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "00004_lr.dat" not in line))
    with pytest.raises(FetchError, match=r"not listed in the server's SHA256SUMS.txt.*00004_lr\.dat"):
        fetch(tmp_path / "out", records=5, base_url=mirror.base_url, progress=False)


def test_offline_says_to_use_an_existing_copy(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match=r"cannot reach .*set PTBXL_DIR .* to an existing copy of PTB-XL"):
        fetch(tmp_path / "out", records=1, base_url=f"http://127.0.0.1:{port}/ptb-xl/", progress=False, timeout=5)


def test_sha256sums_parser_accepts_both_layouts_and_rejects_junk(tmp_path):
    digest = "a" * 64
    sums = tmp_path / "SHA256SUMS.txt"
    sums.write_text(f"{digest} records100/x.dat\n{digest.upper()}  *records100/y.hea\n\n")
    assert read_sha256sums(sums) == {"records100/x.dat": digest, "records100/y.hea": digest}
    sums.write_text("not a checksum line\n")
    with pytest.raises(FetchError, match="SHA256SUMS.txt:1"):
        read_sha256sums(sums)


@pytest.mark.shared_data
def test_fetch_from_a_mirror_of_the_real_data(shared_ptbxl, tmp_path):
    with (shared_ptbxl / "ptbxl_database.csv").open(newline="") as handle:
        first = sorted(int(row["ecg_id"]) for row in csv.DictReader(handle))[:3]
    root = build_mirror(shared_ptbxl, tmp_path / "mirror", ecg_ids=first)
    with MirrorServer(root) as server:
        out = tmp_path / "out"
        fetch(out, records=3, base_url=server.base_url, progress=False)
    cache = str(tmp_path / "cache")
    fetched = load_dataset(DataConfig(root=str(out), cache_dir=cache), progress=False)
    original = load_dataset(DataConfig(root=str(shared_ptbxl), cache_dir=cache), ecg_ids=first, progress=False)
    assert fetched.ecg_ids.tolist() == first
    assert np.array_equal(fetched.signals, original.signals) and np.array_equal(fetched.labels, original.labels)
    assert verify_checksums(out, progress=False)[1] == []
