"""Shared fixtures: the real PTB-XL subset (when present) and a tiny PTB-XL-layout folder written at test time."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

# One intra-op thread: tiny test models gain nothing from two, and OpenMP spinning on a shared
# 2-core machine made small ops many times slower.
torch.set_num_threads(1)

from tests.fixtures_ptbxl import SHARED_PTBXL, TinyPtbxl, make_tiny_ptbxl


@pytest.fixture(scope="session")
def shared_ptbxl() -> Path:
    """../shared/ptb-xl (6,000 real records, folds 1-9); tests that need it are skipped when it is absent."""
    if not (SHARED_PTBXL / "ptbxl_database.csv").is_file():
        pytest.skip("../shared/ptb-xl is not present")
    return SHARED_PTBXL.resolve()


@pytest.fixture(scope="session")
def _tiny_ptbxl_template(tmp_path_factory: pytest.TempPathFactory) -> TinyPtbxl:
    return make_tiny_ptbxl(tmp_path_factory.mktemp("tiny-template") / "ptb-xl")


@pytest.fixture
def tiny_ptbxl(_tiny_ptbxl_template: TinyPtbxl, tmp_path: Path) -> TinyPtbxl:
    """A private copy (tests may damage it) of a 40-record PTB-XL folder: 34 patients, sites 0-3 and one
    missing, folds 1..10, missing height/weight, age 300 and a missing age."""
    root = tmp_path / "ptb-xl"
    shutil.copytree(_tiny_ptbxl_template.root, root)
    template = _tiny_ptbxl_template
    return dataclasses.replace(template, root=root, rows=[dict(r) for r in template.rows],
                               signals8={k: v.copy() for k, v in template.signals8.items()})
