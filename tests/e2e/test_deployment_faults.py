"""Faults a deployment survives, on real processes over loopback: SuperLink, SuperNodes, ServerApp, `flwr run`.

Two runs, each with its faults injected from the runner's watch loop (every process found and stopped by pid):

* site faults (4 sites, min_sites 2, 3 rounds, tests/e2e/faulty_client_app.py as the ClientApp): site 0's
  SuperNode is killed while its round-1 update is trained but not sent, and rejoins with the same key and
  state directory in round 3; site 1 sends NaN, wrong shapes and an absurd norm in rounds 1, 2 and 3; site 2's
  record files are truncated after round 2. Every round completes with the others; every step is accounted.
* server kill + resume (2 sites, the product's ClientApp, plain aggregation): the SuperLink and its ServerApp
  are killed once both sites have trained round 2 but before the server checkpointed it; `resume` continues
  from the round-1 checkpoint, the sites answer the repeated round 2 with what they released for it (no new
  spend), and the run finishes all 3 rounds. The final weights equal an uninterrupted in-process federation's
  from the same start and the sites' secret keys.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch

from common.privacy import verify_release
from simulations.deploy.flower import DeploymentError, process_environment, stage_app
from simulations.deploy.launch import Launch, StagedRun
from simulations.deploy.loopback import deployment_launch, loopback_security
from simulations.deploy.runs import _run, _stage_run, run_loopback_deployment
from simulations.deploy.sites import REGISTRY, read_registry
from simulations.deploy.supervisor import ProcessId, Supervisor
from tests.e2e.faulty_client_app import PLAN_ENV
from tests.e2e.test_deployment import CONFIG, PROJECT, still_running

pytestmark = pytest.mark.slow


def _kill_family(root: ProcessId) -> list[int]:
    """SIGKILL a process and all its descendants, by pid (the way a machine or a site's host dies)."""
    proc = psutil.Process(root.pid)
    assert proc.create_time() == root.create_time
    family = [*proc.children(recursive=True), proc]
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    return [p.pid for p in family]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _sites_in_round(rows: list[dict], server_round: int) -> dict[str, dict]:
    return {r["site"]: r for r in rows if int(r["round"]) == server_round and r["site"] != "global"}


def _ledger(state_root: Path, site: str) -> tuple[Path, dict]:
    [path] = state_root.glob(f"{site}-*/ledger.json")
    return path.parent, json.loads(path.read_text())


def _train_log_rounds(site_dir: Path) -> list[int]:
    path = site_dir / "train_log.csv"
    if not path.is_file():
        return []
    with path.open() as handle:
        return [int(row["round"]) for row in csv.DictReader(handle)]


def _supernode_env(staged: StagedRun, site: int) -> dict[str, str]:
    """The environment deployment_launch gives a SuperNode (its own FLWR_HOME, a share of the cores)."""
    env = process_environment(staged.run_dir / ".flwr" / f"supernode-{site}")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // staged.num_sites)))
    return env


def _faulty_project(dest: Path) -> Path:
    """A copy of the app whose ClientApp is tests/e2e/faulty_client_app.py; the project itself is untouched."""
    project = stage_app(PROJECT, dest)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert 'clientapp = "client.client_app:app"' in text
    pyproject.write_text(text.replace('clientapp = "client.client_app:app"',
                                      'clientapp = "tests.e2e.faulty_client_app:app"'))
    assert (project / "tests" / "e2e" / "faulty_client_app.py").is_file()
    return project


class SiteFaults:
    """Called from the runner's watch loop: kill site 0 mid-round 1, restart it during round 2, then corrupt
    site 2's records once it has trained round 2, and let round 2 end (site 3 holds it open until then)."""

    def __init__(self, launch: Launch, staged: StagedRun, control: Path, state_root: Path) -> None:
        self.launch, self.staged, self.control, self.state_root = launch, staged, control, state_root
        self.killed: list[int] = []
        self.killed_at = self.offline_after_s = 0.0
        self.restarted = self.corrupted = False
        self.corrupted_files: list[Path] = []

    @property
    def supervisor(self) -> Supervisor:
        return self.launch.supervisor

    def __call__(self) -> None:
        run_dir = self.staged.run_dir
        if not self.killed and (self.control / "training-0-1").exists():
            clientapp = int((self.control / "training-0-1").read_text())
            self.killed = _kill_family(self.supervisor.roots["supernode-0"])
            assert clientapp in self.killed, "the training ClientApp was not the SuperNode's descendant"
            self.killed_at = time.monotonic()
        elif self.killed and not self.offline_after_s and any(int(r["round"]) == 1 for r in _metrics(run_dir)):
            self.offline_after_s = time.monotonic() - self.killed_at  # round 1 ended once Flower saw site 0 gone
        elif self.offline_after_s and not self.restarted and (self.control / "waiting-3-2").exists():
            # Round 2's messages are out (site 3 holds the round open): the same key, node config and state
            # directory come back as a new SuperNode process, which round 3 will find online.
            self.supervisor.start("supernode-0-rejoined", self.supervisor.commands["supernode-0"],
                                  _supernode_env(self.staged, 0))
            self.restarted = True
        elif self.restarted and not self.corrupted and self._site0_active_again() and \
                2 in _train_log_rounds(_ledger(self.state_root, "iid-2")[0]):
            self._corrupt_site2()
            (self.control / "go-3-2").write_text("")  # site 3 may now finish round 2, and round 3 begin
            self.corrupted = True

    def _site0_active_again(self) -> bool:
        registry = read_registry(self.staged.run_dir / ".flwr" / "superlink" / REGISTRY)
        node = next(s.node_id for s in registry if s.index == 0)
        text = (self.supervisor.log_dir / "superlink.log").read_text(errors="replace")
        return text.count(f"Activated node_id={node}") >= 2

    def _corrupt_site2(self) -> None:
        """Truncate every record file of site 2 (the others' records, in the same folder, stay intact)."""
        from common.data.metadata import load_metadata
        from common.data.partition import make_partition

        cfg = self.staged.cfg
        meta = load_metadata(cfg.data)
        site = make_partition(meta, cfg.partition).sites[2]
        for ecg_id in [*site.train_ids, *site.val_ids]:
            dat = self.staged.data_root / f"{meta.loc[ecg_id, 'filename_lr']}.dat"
            dat.write_bytes(dat.read_bytes()[:100])
            self.corrupted_files.append(dat)


def test_a_killed_site_a_hostile_site_and_a_corrupted_site_leave_the_rounds_and_the_ledgers_whole(
    tiny_ptbxl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    control = tmp_path / "control"
    control.mkdir()
    faults = {"0/1": "hang", "1/1": "nan", "1/2": "shape", "3/2": "wait", "1/3": "norm"}
    plan = tmp_path / "fault_plan.json"
    plan.write_text(json.dumps({"control": str(control), "faults": faults}))
    monkeypatch.setenv(PLAN_ENV, str(plan))  # inherited by the SuperNodes and their ClientApp processes
    state_root = tmp_path / "sites"
    # Plain aggregation: the server checks each site's update (under SecAgg+ each site checks its own).
    overrides = ["partition.num_sites=4", "federation.min_sites=2", "federation.rounds=3", "train.batch_size=4",
                 "federation.secure_aggregation=false", "evaluation.site_records=0",
                 f"data.cache_dir={tmp_path / 'cache'}", f"federation.site_state_dir={state_root}"]
    staged = _stage_run(CONFIG, overrides, tiny_ptbxl.root, tmp_path / "run", _faulty_project(tmp_path / "app"),
                        "loopback")
    launch = deployment_launch(staged, 600, loopback_security(staged.run_dir, None, False))
    launch.watched = ["superlink"]  # SuperNodes die and come back on purpose here
    inject = SiteFaults(launch, staged, control, state_root)
    adopt = launch.poll
    launch.poll = lambda: (adopt(), inject())
    result = _run(staged, launch, 600, progress=False)
    run_dir = result.run_dir

    assert result.status == "finished:completed"
    assert inject.killed and inject.restarted and inject.corrupted
    assert [p.pid for p in result.processes if still_running(p)] == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in inject.killed)
    for r in (1, 2, 3):
        assert (run_dir / "checkpoints" / f"round_{r:04d}" / "checkpoint.json").is_file()

    rows = _metrics(run_dir)
    r1, r2, r3 = (_sites_in_round(rows, r) for r in (1, 2, 3))
    # Round 1: site 0 died mid-training, site 1's NaN was refused; sites 2 and 3 made the round.
    assert set(r1) == {"iid-1", "iid-2", "iid-3"}
    assert r1["iid-1"]["rejected"].startswith("finite:")
    # Round 2: site 0 still away; site 1's wrong shapes refused.
    assert set(r2) == {"iid-1", "iid-2", "iid-3"}
    assert r2["iid-1"]["rejected"].startswith("shape:")
    # Round 3: site 0 is back; site 1's absurd norm refused; site 2 failed on its own data.
    assert set(r3) == {"iid-0", "iid-1", "iid-3"}
    assert r3["iid-1"]["rejected"].startswith("norm:")
    for r, accepted in ((1, {"iid-2", "iid-3"}), (2, {"iid-2", "iid-3"}), (3, {"iid-0", "iid-3"})):
        assert {s for s, row in _sites_in_round(rows, r).items() if not row["rejected"]} == accepted
        assert sum(1 for row in rows if int(row["round"]) == r and row["site"] == "global") == 1

    server_log = (result.log_dir / "flwr-run.log").read_text(errors="replace")
    registry = {s.index: s for s in read_registry(run_dir / ".flwr" / "superlink" / REGISTRY)}
    for r, check in ((1, "finite"), (2, "shape"), (3, "norm")):
        assert f"round {r}: rejected the update of site iid-1 (node {registry[1].node_id}), check {check}" in server_log
    assert f"round 1: node {registry[0].node_id} failed" in server_log  # the dead site, named
    site2_failure = next(line for line in server_log.splitlines() if f"round 3: node {registry[2].node_id} failed" in line)
    assert ".dat is truncated" in site2_failure, site2_failure
    assert ".dat is truncated" in (result.log_dir / "supernode-2.log").read_text(errors="replace")
    # The restarted SuperNode is the same site: same key, same node id (the registry's), same state directory.
    rejoined = (result.log_dir / "supernode-0-rejoined.log").read_text(errors="replace")
    assert "Failed to activate" not in rejoined
    assert inject._site0_active_again()  # superlink.log: site 0's registered node id activated a second time

    # Every DP step a site took is in its ledger and in the certificate: the dead site's round-1 steps
    # (reserved before training) and the refused updates' steps included; the corrupted site spent none in round 3.
    run_key = json.loads((run_dir / "checkpoints" / "round_0003" / "checkpoint.json").read_text())
    run_key = run_key.get("progress", run_key)["run_key"]
    local_steps = staged.cfg.federation.local_steps
    expected = {"iid-0": 2, "iid-1": 3, "iid-2": 2, "iid-3": 3}  # rounds each site trained in
    trained = {"iid-0": [3], "iid-1": [1, 2, 3], "iid-2": [1, 2], "iid-3": [1, 2, 3]}  # rounds it logged
    certificate = {s["site"]: s for s in json.loads((run_dir / "privacy.json").read_text())["sites"]}
    assert verify_release(run_dir) == []
    for site, rounds in expected.items():
        site_dir, ledger = _ledger(state_root, site)
        assert ledger["runs"][run_key]["steps"] == rounds * local_steps, (site, ledger["runs"][run_key])
        assert ledger["draws"] == rounds
        assert _train_log_rounds(site_dir) == trained[site]
        assert certificate[site]["steps"] == rounds * local_steps, certificate[site]
    print(f"\nsite-faults run: {time.monotonic() - started:.0f}s (site 0 seen offline "
          f"{inject.offline_after_s:.0f}s after the kill)")


def _released_round(site_dir: Path) -> int:
    """The round of the release a site keeps for its run (client/release.py), 0 if none."""
    from safetensors import safe_open

    kept = list((site_dir / "released").glob("*.safetensors"))
    if not kept:
        return 0
    try:
        with safe_open(str(kept[0]), framework="pt") as handle:
            return int((handle.metadata() or {}).get("round", 0))
    except Exception:  # being written: not yet released
        return 0


class ServerKill:
    """Called from the runner's watch loop: once both sites have trained round 2 (its steps reserved and its
    weights released), kill the SuperLink and everything below it (SuperExec, ServerApp) by pid, as when the
    server's host dies before it could aggregate and checkpoint the round."""

    def __init__(self, launch: Launch, state_root: Path, sites: int, steps_before_kill: int) -> None:
        self.launch, self.state_root, self.sites, self.steps = launch, state_root, sites, steps_before_kill
        self.killed: list[int] = []
        self.ledgers_at_kill: dict[str, dict] = {}

    def __call__(self) -> None:
        if self.killed:
            return
        ledgers = {}
        for i in range(self.sites):
            found = list(self.state_root.glob(f"iid-{i}-*/ledger.json"))
            if not found:
                return
            if _released_round(found[0].parent) < 2:
                return
            ledgers[f"iid-{i}"] = json.loads(found[0].read_text())
        if all(any(run["steps"] >= self.steps for run in ledger["runs"].values()) for ledger in ledgers.values()):
            self.killed = _kill_family(self.launch.supervisor.roots["superlink"])
            self.ledgers_at_kill = ledgers


def _replay_in_process(cfg, run_key: str, killed_sites: dict[str, Path], state_root: Path, rounds: int,
                       lost_round: int) -> dict[str, torch.Tensor]:
    """The federation without Flower: each site's rounds from its own secret key (copied into a fresh ledger),
    and at `lost_round` (0: none) first the reservation and seed draw of an attempt a crash discarded."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from flwr.supercore.task_identity import TaskIdentity

    from client.site import load_site, train_round
    from common.bundle import initial_state
    from common.privacy import SiteLedger
    from server.strategy import build_strategy

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # Flower's messages need one
    sites = [load_site(cfg, {"site": i}) for i in range(len(killed_sites))]
    ledgers = []
    for site in sites:
        ledger = SiteLedger.open(state_root, site.name, site.record_ids)
        shutil.copyfile(killed_sites[site.name] / "secret.key", ledger.directory / "secret.key")
        ledgers.append(ledger)
    state = initial_state(cfg)[0]
    strategy = build_strategy(cfg)
    for server_round in range(1, rounds + 1):
        replies = []
        for site, ledger in zip(sites, ledgers):
            if server_round == lost_round:
                with ledger.locked():
                    budget = ledger.budget(run_key, lambda: pytest.fail("the budget exists since round 1"))
                    ledger.reserve(run_key, budget, cfg.federation.local_steps)
                    ledger.next_randomness()
            weights, metrics, _ = train_round(cfg, site, ledger, state, server_round, run_key, proximal_mu=0.0)
            assert weights is not None
            replies.append(Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)}),
                                   dst_node_id=0, message_type=MessageType.TRAIN))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        state = aggregated.to_torch_state_dict()
    return state


def test_a_server_killed_mid_round_resumes_from_its_checkpoint_and_no_spend_is_lost_or_doubled(
    tiny_ptbxl, tmp_path: Path
) -> None:
    from common.bundle import load_weights

    started = time.monotonic()
    state_root = tmp_path / "sites"
    overrides = ["federation.rounds=3", "federation.secure_aggregation=false", "evaluation.site_records=0",
                 f"data.cache_dir={tmp_path / 'cache'}", f"federation.site_state_dir={state_root}"]
    run_dir = tmp_path / "run"
    staged = _stage_run(CONFIG, overrides, tiny_ptbxl.root, run_dir, PROJECT, "loopback")
    local_steps, planned = staged.cfg.federation.local_steps, 3 * staged.cfg.federation.local_steps
    launch = deployment_launch(staged, 600, loopback_security(run_dir, None, False))
    kill = ServerKill(launch, state_root, staged.num_sites, steps_before_kill=2 * local_steps)
    adopt = launch.poll
    launch.poll = lambda: (adopt(), kill())
    with pytest.raises(DeploymentError, match="superlink exited") as caught:
        _run(staged, launch, 600, progress=False)
    assert kill.killed
    assert [p.pid for p in caught.value.processes if still_running(p)] == []
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "round_0001", "killed too late"
    round1 = (run_dir / "checkpoints" / "round_0001" / "model.safetensors").read_bytes()
    run_key = json.loads((run_dir / "checkpoints" / "round_0001" / "checkpoint.json").read_text())["progress"]["run_key"]
    for ledger in kill.ledgers_at_kill.values():  # round 2's steps are spent: reserved before training
        assert ledger["runs"][run_key]["steps"] == 2 * local_steps and ledger["draws"] == 2
    killed_attempt = time.monotonic() - started

    result = run_loopback_deployment(CONFIG, overrides, data_root=tiny_ptbxl.root, run_dir=run_dir, timeout_s=600,
                                     progress=False, resume=True)
    assert result.status == "finished:completed"
    assert [p.pid for p in result.processes if still_running(p)] == []
    assert (run_dir / "attempts" / "1" / "logs" / "superlink.log").is_file()  # the killed attempt's logs, kept
    assert (run_dir / "checkpoints" / "round_0001" / "model.safetensors").read_bytes() == round1

    # Each round once in metrics.csv. The repeated round 2 was answered with the sites' round-2 releases (paid
    # for once), so the plan's steps were enough for round 3 too.
    rows = _metrics(run_dir)
    assert sorted((int(r["round"]), r["site"]) for r in rows) == [
        (r, site) for r in (1, 2, 3) for site in ("global", "iid-0", "iid-1")]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "round_0003"
    assert all(int(r["budget-exhausted"]) == 0 for r in rows if int(r["round"]) == 2 and r["site"] != "global")
    resent = (result.log_dir / "supernode-0.log").read_text(errors="replace")
    assert "round 2 was asked for again from the same weights" in resent

    # No spend lost, none counted twice: site ledger = certificate = what the sites took, within the plan.
    certificate = {s["site"]: s for s in json.loads((run_dir / "privacy.json").read_text())["sites"]}
    assert verify_release(run_dir) == []
    killed_sites = {}
    for site in ("iid-0", "iid-1"):
        site_dir, ledger = _ledger(state_root, site)
        killed_sites[site] = site_dir
        assert list(ledger["runs"]) == [run_key]  # the resumed run is the same run in every ledger
        assert ledger["runs"][run_key]["steps"] == planned == certificate[site]["steps"]
        assert ledger["draws"] == 3  # rounds 1, 2 and 3: the repeated round 2 drew nothing
    server_ledger = json.loads((run_dir / "checkpoints" / "round_0001" / "ledger.json").read_text())
    assert all(json.loads(entry["budget"])["steps"] == local_steps for entry in server_ledger.values())

    # The final weights are the ones an uninterrupted federation computes from the same start and the same
    # site secrets: the crash cost nothing but time.
    reference = _replay_in_process(staged.cfg, run_key, killed_sites, tmp_path / "replay-sites", rounds=3,
                                   lost_round=0)
    final = load_weights(run_dir / "checkpoints" / "round_0003" / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[name], reference[name]) for name in final)
    print(f"\nserver-kill run: killed attempt {killed_attempt:.0f}s, whole test {time.monotonic() - started:.0f}s")
