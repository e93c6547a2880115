"""Sampling from a generator: conditioned 12-lead ECGs in mV, written as WFDB records and PTB-XL folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import wfdb
from tqdm.auto import tqdm

from common.bundle import ECGGenerator
from common.data.demographics import demographics_from_metadata, encode_demographics, fold_age
from common.data.labels import labels_from_scp_codes
from common.data.leads import LEAD_NAMES, derive_leads
from common.plotting import plot_ecg_grid
from common.rhythm import beat_maps
from common.train import select_device

SAMPLING_RATE = 100
LENGTH = 1000  # samples per record (10 s)
# PTB-XL stores 1 uV resolution: gain 1000 ADC units per mV in 16-bit format.
ADC_GAIN = 1000.0


@torch.no_grad()
def generate(
    gen: ECGGenerator,
    labels: np.ndarray,
    demographics: np.ndarray,
    mask: np.ndarray,
    seed: int = 0,
    batch_size: int = 64,
    steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    device: str = "auto",
    start_from: tuple[np.ndarray, int] | None = None,
) -> np.ndarray:
    """Sample one 12-lead ECG (float32 [12, 1000], mV) per row of labels [N,71] / demographics [N,4] + mask.

    `start_from=(signals8, step)`: each row's sampling begins from that record ([N, 8, 1000] mV, the model's
    leads) diffused to `step` instead of from pure noise (GaussianDiffusion.sample's SDEdit start). Such
    samples carry those records' content: no DP guarantee covers them (benchmarks on held-out records only).
    Where a sampling network reads a beat map (a rhythm-conditioned public expert), each row's beat times are
    drawn from the generator's public rhythm table, matched on the row's rhythm statements, with `seed`.
    """
    labels = np.asarray(labels, dtype=np.float32)
    n = labels.shape[0]
    if demographics.shape != (n, 4) or mask.shape != (n, 4):
        raise ValueError(f"expected demographics and mask of shape ({n}, 4), got {demographics.shape}, {mask.shape}")
    dev = select_device(device)
    model = gen.sampling_model().to(dev).eval()
    dc = gen.cfg.diffusion
    encoded = encode_demographics(demographics, mask).astype(np.float32)
    if start_from is not None:
        if start_from[0].shape[0] != n:
            raise ValueError(f"start_from: {start_from[0].shape[0]} records for {n} conditioning rows")
        start_x = gen.normalizer.normalize(np.asarray(start_from[0], dtype=np.float64)).astype(np.float32)
    generator = torch.Generator(device=dev).manual_seed(seed)
    table = gen.rhythm_table()
    # Beat times from the public rhythm table, for the network that reads a beat map (common/rhythm.py).
    maps = None if table is None else beat_maps(table.draw(labels, LENGTH, np.random.default_rng(seed)), LENGTH)
    out = np.empty((n, 12, LENGTH), dtype=np.float32)
    batches = range(0, n, batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress or n <= batch_size, leave=False):
        stop = min(n, start + batch_size)
        x = gen.diffusion.sample(
            model,
            torch.from_numpy(labels[start:stop]).to(dev),
            torch.from_numpy(encoded[start:stop]).to(dev),
            steps=steps if steps is not None else dc.sample_steps,
            sampler=dc.sampler,
            eta=dc.eta,
            guidance_scale=guidance_scale if guidance_scale is not None else dc.guidance_scale,
            generator=generator,
            start=None if start_from is None else (torch.from_numpy(start_x[start:stop]).to(dev), start_from[1]),
            rhythm=None if maps is None else torch.from_numpy(maps[start:stop]).to(dev),
        )
        signals8 = gen.normalizer.denormalize(x.float().cpu().numpy().astype(np.float64))
        out[start:stop] = derive_leads(signals8).astype(np.float32)
    if not np.isfinite(out).all():
        raise FloatingPointError("the generator produced non-finite samples")
    return out


def write_record(path_stem: Path, signals12: np.ndarray) -> None:
    """One 12-lead WFDB record at 100 Hz in mV, in PTB-XL's own format (16-bit, 1000 units/mV)."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    limit = (2**15 - 1) / ADC_GAIN
    clipped = np.clip(signals12.T.astype(np.float64), -limit, limit)
    wfdb.wrsamp(
        path_stem.name,
        fs=SAMPLING_RATE,
        units=["mV"] * 12,
        sig_name=list(LEAD_NAMES),
        p_signal=clipped,
        fmt=["16"] * 12,
        adc_gain=[ADC_GAIN] * 12,
        baseline=[0] * 12,
        write_dir=str(path_stem.parent),
    )


def parse_labels(text: str | None, codes: Sequence[str]) -> np.ndarray:
    """'NORM,IMI' -> multi-hot [71]; a superclass or unknown code is an error naming the valid codes."""
    vector = np.zeros(len(codes), dtype=np.float32)
    if not text:
        return vector
    for code in (c.strip() for c in text.split(",")):
        if not code:
            continue
        if code not in codes:
            raise ValueError(f"unknown SCP statement {code!r}; valid statements: {', '.join(codes)}")
        vector[list(codes).index(code)] = 1.0
    return vector


def sample_records(
    gen: ECGGenerator,
    codes: Sequence[str],
    out_dir: str | Path,
    n: int,
    labels: str | None = None,
    age: float | None = None,
    sex: str | None = None,
    height: float | None = None,
    weight: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """`fedecg sample --n N --labels ... --age ... --sex ...`: N records with the same conditions."""
    from common.data.demographics import demographics_from_request

    out_dir = Path(out_dir)
    vector = parse_labels(labels, codes)
    values, present = demographics_from_request(age=age, sex=sex, height=height, weight=weight)
    signals = generate(
        gen,
        np.repeat(vector[None], n, axis=0),
        np.repeat(values[None], n, axis=0),
        np.repeat(present[None], n, axis=0),
        seed=seed,
        progress=progress,
    )
    rows = []
    for i in range(n):
        name = f"synthetic_{i:05d}"
        write_record(out_dir / "records100" / name, signals[i])
        rows.append(
            {
                "record": f"records100/{name}",
                "labels": labels or "",
                "age": age if age is not None else "",
                "sex": sex if sex is not None else "",
                "height": height if height is not None else "",
                "weight": weight if weight is not None else "",
                "seed": seed,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "conditions.csv", index=False)
    title = f"{labels or 'unconditional labels'}; age {age if age is not None else '?'}, sex {sex or '?'}"
    plot_ecg_grid(signals, out_dir / "samples.png", titles=[f"{title} #{i}" for i in range(n)])
    return table


# The columns of a `sample_like` table, in order: the loader's required columns, then the marker.
LIKE_COLUMNS = (
    "ecg_id", "patient_id", "age", "sex", "height", "weight", "site", "scp_codes", "strat_fold",
    "filename_lr", "filename_hr", "synthetic",
)
_LIKE_README = """Synthetic ECGs (synthetic: true)

Every record in this folder was generated by a diffusion model (`fedecg sample --like`); none is a
real patient's recording. ecg_id and patient_id are fresh synthetic ids (1..N, one patient per
record). Per record the table keeps only what the model was conditioned on (scp_codes, age, sex,
height, weight; empty where the model had no value) and the strat_fold of the row it was sampled
like; site and filename_hr are empty, and the column `synthetic` is 1 on every row.
"""


def _like_table(meta: pd.DataFrame) -> pd.DataFrame:
    """The synthetic ptbxl_database.csv rows for `meta` (see `sample_like`), indexed by ecg_id 1..N."""
    n = len(meta)
    ids = np.arange(1, n + 1, dtype=np.int64)
    _, present = demographics_from_metadata(meta)
    # The values the model got, taken from the float64 columns so that they read back exactly.
    values = meta.loc[:, ["age", "sex", "height", "weight"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    values[:, 0] = fold_age(values[:, 0])
    values[~present] = np.nan
    return pd.DataFrame({
        "patient_id": ids,
        "age": values[:, 0],
        "sex": pd.array([int(v) if ok else pd.NA for v, ok in zip(values[:, 1], present[:, 1])], dtype="Int64"),
        "height": values[:, 2],
        "weight": values[:, 3],
        "site": np.full(n, np.nan),
        "scp_codes": [repr({str(k): float(v) for k, v in dict(c).items()}) for c in meta["scp_codes"]],
        "strat_fold": pd.to_numeric(meta["strat_fold"]).to_numpy(np.int64),
        "filename_lr": [f"records100/{(int(i) // 1000) * 1000:05d}/{int(i):05d}_lr" for i in ids],
        "filename_hr": [""] * n,
        "synthetic": np.ones(n, dtype=np.int64),
    }, index=pd.Index(ids, name="ecg_id"))


def sample_like(
    gen: ECGGenerator,
    meta: pd.DataFrame,
    codes: Sequence[str],
    out_dir: str | Path,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    scp_statements: Path | None = None,
) -> Path:
    """One synthetic record per row of a PTB-XL table (as `read_metadata_table` returns it), conditioned
    on its scp_codes and demographics.

    The output is a PTB-XL-format folder (ptbxl_database.csv, records100/ in the official layout,
    scp_statements.csv when given, README.txt, samples.png) that the project's loader and PTB-XL
    pipelines read, and that carries no real identifier or free text. Its table has only the columns in
    `LIKE_COLUMNS`:
    - ecg_id and patient_id: fresh ids 1..N, synthetic record k being the one sampled like row k-1 of
      `meta` in the given order (a caller holding `meta` can pair them in memory; the folder cannot);
    - scp_codes, age, sex, height, weight: the conditioning the model got (scp_codes with their
      likelihoods, though the model uses only which statements are listed; age PTB-XL's 300 written as
      the 90 the model saw; missing stays empty);
    - strat_fold: copied from the row, because the loader needs an integer fold and PTB-XL pipelines
      split by it (folds are patient-level split labels, not identifying);
    - site: empty (the loader needs the column; the real site is not carried over);
    - filename_lr: the generated 100 Hz record; filename_hr: empty (no 500 Hz version is generated);
    - synthetic: 1 on every row (also stated in README.txt).
    Every other column of the real table (report text, nurse, device, recording date, ...) is dropped.
    """
    out_dir = Path(out_dir)
    if len(meta) == 0:
        raise ValueError("the --like table has no rows")
    labels = labels_from_scp_codes(meta["scp_codes"], codes)
    values, present = demographics_from_metadata(meta)
    table = _like_table(meta)
    signals = generate(gen, labels, values, present, seed=seed, batch_size=batch_size, progress=progress)
    for i, stem in enumerate(tqdm(table["filename_lr"], desc="writing", disable=not progress, leave=False)):
        write_record(out_dir / stem, signals[i])
    table.to_csv(out_dir / "ptbxl_database.csv", index_label="ecg_id")
    (out_dir / "README.txt").write_text(_LIKE_README)
    if scp_statements is not None and scp_statements.is_file():
        (out_dir / "scp_statements.csv").write_bytes(scp_statements.read_bytes())
    preview = min(4, len(signals))
    plot_ecg_grid(
        signals[:preview],
        out_dir / "samples.png",
        titles=[f"synthetic {int(i)}: {table.loc[i, 'scp_codes']}" for i in table.index[:preview]],
    )
    return out_dir


def grid_conditions(codes: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A fixed, data-free set of conditions for progress PNGs: common statements, mid-aged patients."""
    menu = ["NORM", "IMI", "AFIB", "LVH", "CLBBB", "ASMI", "NDT", "SR"]
    chosen = [c for c in menu if c in codes][: max(1, n)]
    while len(chosen) < n:
        chosen.append(chosen[len(chosen) % len(chosen)])
    labels = np.stack([parse_labels(c, codes) for c in chosen])
    ages = np.array([[60.0, i % 2, math.nan, math.nan] for i in range(n)], dtype=np.float32)
    mask = np.array([[True, True, False, False]] * n)
    titles = [f"{c}, age 60, {'female' if i % 2 else 'male'}" for i, c in enumerate(chosen)]
    return labels, ages, mask, titles
