"""A site's lifetime privacy ledger and its secret randomness, kept beside its data and never sent.

    ledger = SiteLedger.open(state_root, "site-0", record_ids)   # directory keyed by the records' fingerprint
    with ledger.locked():
        budget = ledger.budget(run_key, plan)       # refuses a plan that would exceed the lifetime budget
        steps = ledger.reserve(run_key, budget, wanted)   # written to disk before any step is taken
        randomness = ledger.next_randomness()       # secret seeds, never reused

One directory per set of records (`<root>/<site>-<fingerprint>`): `ledger.json` holds every run's
(sigma, q, steps), so a new run directory over the same data composes with everything spent before;
`secret.key` holds 32 bytes of OS entropy from which every DP seed is derived with HMAC and a counter.
The counter advances (on disk) before a seed is used, so no seed is ever used twice, not even when the
server asks for the same round again or a site restarts mid-round. Copying the key (and nothing else)
into a fresh ledger replays the same seeds: that is how a resumed run stays bit-identical, and why the
key must stay with the site's operator.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from common.privacy.accounting import History, SiteBudget, compress_history, epsilon_of
from common.privacy.engine import DPRandomness

LEDGER_FORMAT = "fedecg-site-ledger/1"


class LedgerError(RuntimeError):
    """A plan the ledger refuses (budget, concurrent use) or a ledger file that does not belong here."""


def records_fingerprint(record_ids: Iterable[int]) -> str:
    ids = sorted(int(i) for i in record_ids)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


class SiteLedger:
    def __init__(self, directory: Path, site: str, fingerprint: str) -> None:
        self.directory = directory
        self.site = site
        self.fingerprint = fingerprint
        self._lock_handle = None

    @classmethod
    def open(cls, root: str | Path, site: str, record_ids: Iterable[int]) -> "SiteLedger":
        fingerprint = records_fingerprint(record_ids)
        directory = Path(root) / f"{site}-{fingerprint[:16]}"
        directory.mkdir(parents=True, exist_ok=True)
        ledger = cls(directory, site, fingerprint)
        state = ledger._read()
        if state["fingerprint"] != fingerprint:
            raise LedgerError(f"{directory}: ledger belongs to other records (fingerprint {state['fingerprint'][:16]})")
        return ledger

    # -- files ---------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.directory / "ledger.json"

    def _read(self) -> dict:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"format": LEDGER_FORMAT, "site": self.site, "fingerprint": self.fingerprint, "runs": {}, "draws": 0,
                "resets": []}

    def _write(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new ledger, never half of one

    def _key(self) -> bytes:
        path = self.directory / "secret.key"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32))
        return path.read_bytes()

    @contextlib.contextmanager
    def locked(self) -> Iterator["SiteLedger"]:
        """Exclusive use of this site's records: a second process training the same site is refused."""
        handle = open(self.directory / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LedgerError(
                f"site {self.site}: another process is training on these records now ({self.directory}); "
                "two nodes configured with the same site would both spend its budget"
            ) from None
        try:
            yield self
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # -- accounting ----------------------------------------------------------------------------------

    def history(self, exclude_run: str | None = None) -> History:
        runs = self._read()["runs"]
        return compress_history(
            [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for key, r in runs.items() if key != exclude_run]
        )

    def budget(self, run_key: str, make_plan: Callable[[], SiteBudget]) -> SiteBudget:
        """This run's budget: resumed from the ledger, or a new plan if the lifetime budget can afford it."""
        state = self._read()
        prior = self.history(exclude_run=run_key)
        run = state["runs"].get(run_key)
        if run is not None:
            stored = SiteBudget.from_json(json.dumps(run["budget"]))
            stored.steps = int(run["steps"])
            stored.prior_history = prior
            return stored
        plan = make_plan()
        plan.prior_history = prior
        plan.steps = 0
        if plan.certified_epsilon() > plan.lifetime_epsilon * (1 + 1e-9):
            raise LedgerError(
                f"site {self.site}: these records have already spent epsilon {epsilon_of(prior, plan.delta):.3f} "
                f"({sum(n for _, _, n in prior)} steps, ledger {self.path}); this run's plan would take them to "
                f"{plan.certified_epsilon():.3f}, past the lifetime budget {plan.lifetime_epsilon:g}. Raise "
                f"privacy.lifetime_epsilon knowingly, or reset the ledger explicitly (`fedecg privacy ledger reset`)."
            )
        state["runs"][run_key] = {"budget": _plan_fields(plan), "noise_multiplier": plan.noise_multiplier,
                                  "sample_rate": plan.sample_rate, "steps": 0, "started": time.time()}
        self._write(state)
        return plan

    def reserve(self, run_key: str, budget: SiteBudget, wanted: int) -> int:
        """Count the steps this round will take, on disk, before taking them; returns how many it may take."""
        steps = budget.affordable(wanted)
        if steps:
            state = self._read()
            state["runs"][run_key]["steps"] = int(state["runs"][run_key]["steps"]) + steps
            self._write(state)
            budget.steps += steps
        return steps

    def next_randomness(self) -> DPRandomness:
        """Fresh secret seeds: HMAC(key, counter), the counter written back before the seeds are returned."""
        state = self._read()
        draw = int(state["draws"])
        state["draws"] = draw + 1
        self._write(state)
        key = self._key()

        def seed(purpose: str) -> int:
            digest = hmac.new(key, f"{purpose}/{draw}".encode(), hashlib.sha256).digest()
            return int.from_bytes(digest[:8], "little") >> 1

        return DPRandomness(sampling=seed("sampling"), noise=seed("noise"), training=seed("training"))

    def reset(self, reason: str) -> None:
        """Forget every run (an explicit operator decision, recorded), and draw a new secret key."""
        state = self._read()
        resets = state.get("resets", []) + [{"time": time.time(), "reason": reason, "history_forgotten": self.history()}]
        fresh = {"format": LEDGER_FORMAT, "site": self.site, "fingerprint": self.fingerprint, "runs": {},
                 "draws": 0, "resets": resets}
        self._write(fresh)
        (self.directory / "secret.key").unlink(missing_ok=True)

    def summary(self) -> dict:
        state = self._read()
        return {"site": self.site, "directory": str(self.directory), "runs": len(state["runs"]),
                "steps": sum(int(r["steps"]) for r in state["runs"].values()), "history": self.history(),
                "resets": len(state.get("resets", []))}


def _plan_fields(plan: SiteBudget) -> dict:
    fields = json.loads(plan.to_json())
    fields.pop("prior_history")
    fields.pop("steps")
    return fields


def ledgers_under(root: str | Path) -> list[SiteLedger]:
    """Every site ledger below `root` (for `fedecg privacy ledger`)."""
    out = []
    for path in sorted(Path(root).glob("*/ledger.json")):
        state = json.loads(path.read_text())
        out.append(SiteLedger(path.parent, state["site"], state["fingerprint"]))
    return out
