"""`fedecg data verify | fetch | partition`, driven through argparse as the `fedecg` CLI does."""

from __future__ import annotations

import argparse
import socket
from collections import Counter
from pathlib import Path

import pytest

from common.data.metadata import read_metadata
from common.data.partition_types import Partition
from simulations import data_commands
from tests.fixtures_ptbxl import MirrorServer, build_mirror


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedecg")
    data_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_config(path: Path, root: Path, **partition: object) -> Path:
    lines = ["data:", f"  root: {root}", f"  cache_dir: {path.parent / 'cache'}", "partition:"]
    lines += [f"  {key}: {value}" for key, value in partition.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_verify_summarizes_a_good_folder(tiny_ptbxl, capsys):
    assert run(["data", "verify", str(tiny_ptbxl.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "records       40" in out and "patients      34" in out
    sites = Counter(r["site"] for r in tiny_ptbxl.rows if r["site"] is not None).most_common()
    assert f"largest: {', '.join(f'{k}: {v}' for k, v in sites)}; site missing: 1" in out
    assert "folds         1: 5, 2: 5" in out and "10: 3" in out
    assert "NORM: 10" in out and "SR: 25" in out
    assert "age: 1, sex: 0, height: 13, weight: 10; age over 89 (coded 300): 1" in out
    assert "80 files listed in SHA256SUMS.txt, 0 problem(s)" in out and "verify: OK" in out


def test_verify_reports_corrupted_and_missing_files_and_fails(tiny_ptbxl, capsys):
    dat = tiny_ptbxl.root / "records100/00000/00003_lr.dat"
    data = bytearray(dat.read_bytes())
    data[100] ^= 0x01
    dat.write_bytes(bytes(data))
    (tiny_ptbxl.root / "records100/00000/00007_lr.dat").unlink()
    assert run(["data", "verify", str(tiny_ptbxl.root), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "records100/00000/00003_lr.dat: SHA256 mismatch" in err
    assert "records100/00000/00007_lr.dat: listed in SHA256SUMS.txt but missing" in err
    assert "ecg_id 7: signal file records100/00000/00007_lr.dat is missing" in err
    assert "verify: 3 problem(s)" in err


def test_verify_without_checksums_and_without_a_folder(tiny_ptbxl, monkeypatch, capsys):
    (tiny_ptbxl.root / "SHA256SUMS.txt").unlink()
    assert run(["data", "verify", str(tiny_ptbxl.root)]) == 0
    assert "no SHA256SUMS.txt: file contents not checked" in capsys.readouterr().out
    monkeypatch.delenv("PTBXL_DIR", raising=False)
    assert run(["data", "verify"]) == 2
    assert "set PTBXL_DIR" in capsys.readouterr().err
    monkeypatch.setenv("PTBXL_DIR", str(tiny_ptbxl.root))
    assert run(["data", "verify", "--quiet"]) == 0


def test_fetch_command(tiny_ptbxl, tmp_path, capsys):
    root = build_mirror(tiny_ptbxl.root, tmp_path / "mirror", ecg_ids=[1, 2, 3])
    out = tmp_path / "out"
    with MirrorServer(root) as server:
        assert run(["data", "fetch", "--out", str(out), "--records", "3", "--base-url", server.base_url, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fetched 3 records" in printed and f"export PTBXL_DIR={out}" in printed
    assert run(["data", "verify", str(out), "--quiet"]) == 0
    code = run(["data", "fetch", "--out", str(out), "--base-url", f"http://127.0.0.1:{closed_port()}/x/", "--quiet"])
    assert code == 2 and "PTBXL_DIR" in capsys.readouterr().err


def closed_port() -> int:
    with socket.socket() as probe:  # bound, then released: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_partition_command_writes_exact_json_and_prints_the_summary(tiny_ptbxl, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_ptbxl.root, scheme="site", num_sites=3)
    out = tmp_path / "split" / "partition.json"
    assert run(["data", "partition", "--config", str(cfg), "--set", "partition.rest=merge", "--out", str(out)]) == 0
    partition = Partition.from_json(out.read_text())
    assert partition.site_names == ["site-0", "site-1", "site-2", "site-rest"]
    printed = capsys.readouterr().out
    assert "site-rest" in printed and "age_median" in printed and "wrote site partition with 4 sites" in printed
    assert run(["data", "partition", "--config", str(cfg), "--set", "partition.num_sites=9", "--out", str(out)]) == 2
    assert "num_sites=9 but only 4 recording site(s)" in capsys.readouterr().err
    assert run(["data", "partition", "--config", str(cfg), "--set", "partition.nope=1", "--out", str(out)]) == 2
    assert "unknown key 'partition.nope'" in capsys.readouterr().err


@pytest.mark.shared_data
def test_partition_by_site_of_the_real_data_gives_three_patient_disjoint_sites(shared_ptbxl, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", shared_ptbxl, scheme="site", num_sites=3)
    out = tmp_path / "partition.json"
    assert run(["data", "partition", "--config", str(cfg), "--out", str(out)]) == 0
    partition = Partition.from_json(out.read_text())
    meta = read_metadata(shared_ptbxl)
    assert len(partition.sites) >= 3
    owners: dict[int, str] = {}
    for site in partition.sites:
        assert len(site.train_ids) > 500
        for patient in set(meta.loc[list(site.ids), "patient_id"]):
            assert owners.setdefault(patient, site.name) == site.name
    assert partition.test_ids == ()  # the shared subset has no fold 10
    assert "site-0" in capsys.readouterr().out


@pytest.mark.shared_data
def test_verify_the_real_data(shared_ptbxl, capsys):
    assert run(["data", "verify", str(shared_ptbxl), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "records       6000" in out and "12000 files listed in SHA256SUMS.txt, 0 problem(s)" in out


def test_sample_takes_a_guidance_scale_and_refuses_a_negative_one(tiny_ptbxl, tmp_path, monkeypatch):
    import common.generate
    from simulations.cli import main
    from tests.common.evaluation.test_report import write_tiny_bundle

    bundle = write_tiny_bundle(tmp_path / "bundle", tiny_ptbxl.root)
    seen = []
    real_generate = common.generate.generate

    def recording(gen, *args, **kwargs):
        seen.append(gen.cfg.diffusion.guidance_scale)
        return real_generate(gen, *args, **kwargs)

    monkeypatch.setattr(common.generate, "generate", recording)
    request = ["sample", "--bundle", str(bundle), "--n", "1", "--labels", "NORM", "--quiet"]
    assert main([*request, "--out", str(tmp_path / "own")]) == 0
    assert main([*request, "--guidance", "2.5", "--out", str(tmp_path / "guided")]) == 0
    assert seen == [1.0, 2.5]  # the bundle's own scale, then the requested one
    assert main([*request, "--guidance", "-1", "--out", str(tmp_path / "bad")]) != 0
