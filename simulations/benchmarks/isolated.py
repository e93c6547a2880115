"""Run one benchmark variant in its own process (clean Opacus registry and peak memory) and collect its JSON line."""

from __future__ import annotations

import json
import subprocess


def run_isolated(command: list[str], identity: dict, json_path: str | None) -> dict:
    """The variant's last JSON line on stdout, or `identity` with the error; printed and appended to json_path."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        result = {**identity, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    else:
        result = json.loads(lines[-1])
    print(json.dumps(result), flush=True)
    if json_path:
        with open(json_path, "a") as handle:
            handle.write(json.dumps(result) + "\n")
    return result
