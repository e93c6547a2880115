"""Resuming a loopback deployment: the run directory must hold a checkpoint; the earlier attempt's files are kept."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from simulations.deploy.runs import _prepare_run_dir, _stage_run
from simulations.deploy_loopback import main
from tests.e2e.test_deployment import CONFIG, PROJECT


def _fake_checkpoint(run_dir: Path) -> None:
    (run_dir / "checkpoints" / "round_0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_0001" / "checkpoint.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("round_0001\n")


def test_resume_needs_a_checkpoint_and_keeps_each_earlier_attempt(tmp_path: Path) -> None:
    from common.config import load

    cfg = load(CONFIG)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _prepare_run_dir(tmp_path / "run", cfg, "loopback", resume=True)
    with pytest.raises(ValueError, match="needs the run directory"):
        _prepare_run_dir(None, cfg, "loopback", resume=True)
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir)
    with pytest.raises(FileExistsError, match="already holds a run"):  # without resume, never reused
        _prepare_run_dir(run_dir, cfg, "loopback")
    for attempt in (1, 2):
        (run_dir / ".flwr" / "certs").mkdir(parents=True)
        (run_dir / ".flwr" / "certs" / "ca.crt").write_text(f"attempt {attempt}")
        (run_dir / "logs").mkdir()
        (run_dir / "logs" / "superlink.log").write_text(f"attempt {attempt}")
        assert _prepare_run_dir(run_dir, cfg, "loopback", resume=True) == run_dir.resolve()
        assert not (run_dir / ".flwr").exists() and not (run_dir / "logs").exists()
        kept = run_dir / "attempts" / str(attempt)
        assert (kept / ".flwr" / "certs" / "ca.crt").read_text() == (kept / "logs" / "superlink.log").read_text() \
            == f"attempt {attempt}"
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_a_resumed_run_tells_the_server_app_to_resume(tiny_ptbxl, tmp_path: Path) -> None:
    from flwr.common.config import get_fused_config_from_dir

    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir)
    staged = _stage_run(CONFIG, [f"data.cache_dir={tmp_path / 'cache'}"], tiny_ptbxl.root, run_dir, PROJECT,
                        "loopback", resume=True)
    run_config = tomllib.loads(staged.run_config.read_text())
    assert run_config["resume"] is True and run_config["run-dir"] == str(run_dir.resolve())
    # Flower refuses run-config keys the app's pyproject does not declare: `resume` is declared.
    assert get_fused_config_from_dir(staged.app, run_config)["resume"] is True


def test_command_line_resume_needs_a_run_directory_with_a_checkpoint(
    tiny_ptbxl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--resume", "--quiet"]) == 2
    assert "--resume continues a deployment" in capsys.readouterr().err
    assert main(["--resume", "--local-simulation", "--out", str(tmp_path)]) == 2
    assert main(["--resume", "--out", str(tmp_path / "empty"), "--data-root", str(tiny_ptbxl.root), "--quiet",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()
