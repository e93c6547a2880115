"""Test fixtures: a tiny PTB-XL-layout folder written with wfdb, and a local PhysioNet-like HTTP mirror.

The tiny folder has the official layout (ptbxl_database.csv, scp_statements.csv, records100/,
SHA256SUMS.txt) and the quirks the loader must handle: patients with two records (one spanning two
sites), folds 1..10, a missing site, missing height/weight, age 300 and a missing age.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

import numpy as np
import wfdb

SHARED_PTBXL = Path(__file__).resolve().parents[1] / ".." / "shared" / "ptb-xl"

# The 71 PTB-XL statements in the order of the official scp_statements.csv:
# code:kinds:diagnostic_class:diagnostic_subclass (kinds: d diagnostic, f form, r rhythm).
SCP_TABLE = (
    "NDT:df:STTC:STTC NST_:df:STTC:NST_ DIG:df:STTC:STTC LNGQT:df:STTC:STTC NORM:d:NORM:NORM IMI:d:MI:IMI "
    "ASMI:d:MI:AMI LVH:d:HYP:LVH LAFB:d:CD:LAFB/LPFB ISC_:d:STTC:ISC_ IRBBB:d:CD:IRBBB 1AVB:d:CD:_AVB "
    "IVCD:d:CD:IVCD ISCAL:d:STTC:ISCA CRBBB:d:CD:CRBBB CLBBB:d:CD:CLBBB ILMI:d:MI:IMI LAO/LAE:d:HYP:LAO/LAE "
    "AMI:d:MI:AMI ALMI:d:MI:AMI ISCIN:d:STTC:ISCI INJAS:d:MI:AMI LMI:d:MI:LMI ISCIL:d:STTC:ISCI "
    "LPFB:d:CD:LAFB/LPFB ISCAS:d:STTC:ISCA INJAL:d:MI:AMI ISCLA:d:STTC:ISCA RVH:d:HYP:RVH ANEUR:d:STTC:STTC "
    "RAO/RAE:d:HYP:RAO/RAE EL:d:STTC:STTC WPW:d:CD:WPW ILBBB:d:CD:ILBBB IPLMI:d:MI:IMI ISCAN:d:STTC:ISCA "
    "IPMI:d:MI:IMI SEHYP:d:HYP:SEHYP INJIN:d:MI:IMI INJLA:d:MI:AMI PMI:d:MI:PMI 3AVB:d:CD:_AVB "
    "INJIL:d:MI:IMI 2AVB:d:CD:_AVB ABQRS:f:: PVC:f:: STD_:f:: VCLVH:f:: QWAVE:f:: LOWT:f:: NT_:f:: PAC:f:: "
    "LPR:f:: INVT:f:: LVOLT:f:: HVOLT:f:: TAB_:f:: STE_:f:: PRC(S):f:: SR:r:: AFIB:r:: STACH:r:: SARRH:r:: "
    "SBRAD:r:: PACE:r:: SVARR:r:: BIGU:r:: AFLT:r:: SVTAC:r:: PSVT:r:: TRIGU:r::"
)
HEADER_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
META_COLUMNS = [
    "ecg_id", "patient_id", "age", "sex", "height", "weight", "site", "device", "recording_date", "report",
    "scp_codes", "strat_fold", "filename_lr", "filename_hr",
]
# Label sets the tiny records cycle through (likelihood 0 included on purpose: it still counts).
CODE_SETS = [
    {"NORM": 100.0, "SR": 0.0},
    {"IMI": 50.0, "ABQRS": 0.0, "SR": 0.0},
    {"LVH": 100.0, "SR": 0.0},
    {"NDT": 100.0, "AFIB": 0.0},
    {"CLBBB": 100.0},
    {"ASMI": 100.0, "ISCAS": 50.0, "SR": 0.0},
    {"NORM": 80.0, "SBRAD": 0.0},
    {"IRBBB": 100.0, "LAFB": 100.0, "SR": 0.0},
]


def scp_rows() -> list[tuple[str, str, str, str]]:
    return [tuple(entry.split(":")) for entry in SCP_TABLE.split()]  # type: ignore[misc]


def write_scp_statements(root: Path) -> None:
    """The real scp_statements.csv when ../shared/ptb-xl is present, else one built from SCP_TABLE."""
    real = SHARED_PTBXL / "scp_statements.csv"
    if real.is_file():
        shutil.copyfile(real, root / "scp_statements.csv")
        return
    with open(root / "scp_statements.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"])
        for code, kinds, cls, subclass in scp_rows():
            flags = ["1.0" if k in kinds else "" for k in "dfr"]
            writer.writerow([code, code.lower(), *flags, cls, subclass])


def derive12(x8: np.ndarray) -> np.ndarray:
    """[T, 8] (I, II, V1..V6) -> [T, 12] in file order, written independently of the code under test."""
    i, ii = x8[:, 0], x8[:, 1]
    limb = np.stack([i, ii, ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2], axis=1)
    return np.concatenate([limb, x8[:, 2:]], axis=1)


def smooth_leads(rng: np.random.Generator, fs: int, seconds: int = 10) -> np.ndarray:
    """[T, 8] band-limited signals (sums of sinusoids below 20 Hz), quantized to 0.001 mV."""
    t = np.arange(fs * seconds) / fs
    freqs = rng.uniform(0.5, 20.0, size=(8, 5))
    amps = rng.uniform(0.05, 0.4, size=(8, 5))
    phases = rng.uniform(0, 2 * np.pi, size=(8, 5))
    x = (amps[:, :, None] * np.sin(2 * np.pi * freqs[:, :, None] * t + phases[:, :, None])).sum(axis=1).T
    return np.round(x, 3)


def write_record(base: Path, p_signal: np.ndarray, fs: int, sig_name: list[str] | None = None,
                 units: str = "mV") -> None:
    """Write a WFDB record (fmt 16, gain 1000/mV) at `base` (.hea/.dat)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    n = p_signal.shape[1]
    wfdb.wrsamp(base.name, fs=fs, units=[units] * n, sig_name=sig_name or HEADER_LEADS[:n], p_signal=p_signal,
                fmt=["16"] * n, adc_gain=[1000.0] * n, baseline=[0] * n, write_dir=str(base.parent))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sha256sums(root: Path, include_tables: bool = False) -> None:
    """SHA256SUMS.txt over the record files (and the csv tables, as the official file does)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root)
    if include_tables:
        files = [root / "ptbxl_database.csv", root / "scp_statements.csv", *files]
    lines = [f"{sha256_of(p)} {p.relative_to(root).as_posix()}" for p in files]
    (root / "SHA256SUMS.txt").write_text("\n".join(lines) + "\n")


@dataclass
class TinyPtbxl:
    root: Path
    rows: list[dict] = field(default_factory=list)  # metadata rows as written
    signals8: dict[int, np.ndarray] = field(default_factory=dict)  # ecg_id -> [8, 1000] mV at 100 Hz

    def row(self, ecg_id: int) -> dict:
        return next(r for r in self.rows if r["ecg_id"] == ecg_id)

    def record_base(self, ecg_id: int) -> Path:
        row = self.row(ecg_id)
        rel = row["filename_lr"] if (self.root / (row["filename_lr"] + ".hea")).exists() else row["filename_hr"]
        return self.root / rel


# Per-patient layout: (site, number of records). Patient 2's second record is at another site (site 1).
_PATIENTS = [
    (0, 2), (1, 2), (0, 2), (2, 2), (0, 2), (1, 2),
    (0, 1), (1, 1), (0, 1), (2, 1), (3, 1), (0, 1), (1, 1), (2, 1), (3, 1), (0, 1), (1, 1),
    (0, 1), (2, 1), (3, 1), (0, 1), (1, 1), (None, 1), (0, 1), (2, 1), (3, 1), (1, 1), (0, 1),
    (0, 1), (1, 1), (2, 1), (0, 1), (3, 1), (0, 1),
]


def write_metadata(root: Path, rows: list[dict]) -> None:
    with open(root / "ptbxl_database.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=META_COLUMNS)
        writer.writeheader()
        for row in rows:
            out = dict(row)
            out["scp_codes"] = repr(row["scp_codes"]) if isinstance(row["scp_codes"], dict) else row["scp_codes"]
            for key in ("age", "height", "weight", "site"):
                out[key] = "" if row[key] is None else f"{float(row[key]):.1f}"
            out["patient_id"] = f"{float(row['patient_id']):.1f}"  # PTB-XL writes patient ids as floats
            writer.writerow(out)


def make_tiny_ptbxl(root: Path, hr_only_ids: tuple[int, ...] = (), seed: int = 0) -> TinyPtbxl:
    """Write 40 records: ecg_ids 1..40, 34 patients (6 with two records), sites 0-3 and one missing,
    folds 1..10 (patient-consistent), missing height/weight, one age 300 and one missing age.
    Records in `hr_only_ids` exist only as 500 Hz files under records500/."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_scp_statements(root)
    tiny = TinyPtbxl(root=root)
    ecg_id = 0
    for patient, (site, count) in enumerate(_PATIENTS):
        fold = patient % 10 + 1
        base_age = float(rng.integers(20, 86))
        for k in range(count):
            ecg_id += 1
            folder = f"{(ecg_id // 1000) * 1000:05d}"
            row = {
                "ecg_id": ecg_id, "patient_id": 1000 + patient, "age": base_age + 3 * k, "sex": patient % 2,
                "height": None if ecg_id % 3 == 0 else float(rng.integers(150, 195)),
                "weight": None if ecg_id % 4 == 0 else float(rng.integers(50, 110)),
                "site": 1 if (patient == 2 and k == 1) else site,
                "device": "CS-12   E", "recording_date": f"1990-01-{(ecg_id % 28) + 1:02d} 10:00:00",
                "report": "sinusrhythmus, normales ekg" if ecg_id % 2 else "tiny, synthetic",
                "scp_codes": CODE_SETS[ecg_id % len(CODE_SETS)], "strat_fold": fold,
                "filename_lr": f"records100/{folder}/{ecg_id:05d}_lr",
                "filename_hr": f"records500/{folder}/{ecg_id:05d}_hr",
            }
            if ecg_id == 5:
                row["age"] = 300.0  # PTB-XL's code for "over 89"
            if ecg_id == 9:
                row["age"] = None
            tiny.rows.append(row)
            if ecg_id in hr_only_ids:
                x500 = smooth_leads(rng, fs=500)
                write_record(root / row["filename_hr"], derive12(x500), fs=500)
                tiny.signals8[ecg_id] = x500[::5].T.copy()  # the 100 Hz reference at the same instants
            else:
                x100 = smooth_leads(rng, fs=100)
                write_record(root / row["filename_lr"], derive12(x100), fs=100)
                tiny.signals8[ecg_id] = x100.T.copy()
    write_metadata(root, tiny.rows)
    write_sha256sums(root)
    return tiny


# ----------------------------------------------------------------------------------------------------
# A local PhysioNet-like mirror


def build_mirror(source: Path, mirror: Path, ecg_ids: list[int]) -> Path:
    """Copy the tables and the records100 files of `ecg_ids` into `mirror`, with an official-style
    SHA256SUMS.txt that lists every file (tables included). Returns the mirror root."""
    mirror.mkdir(parents=True, exist_ok=True)
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copyfile(source / name, mirror / name)
    for ecg_id in ecg_ids:
        folder = f"{(ecg_id // 1000) * 1000:05d}"
        for ext in (".hea", ".dat"):
            rel = f"records100/{folder}/{ecg_id:05d}_lr{ext}"
            (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, mirror / rel)
    write_sha256sums(mirror, include_tables=True)
    return mirror


class MirrorServer:
    """Serves a folder over HTTP on 127.0.0.1 (threaded, port 0) with Range support.

    `corrupt_once` / `corrupt_always`: relative paths whose bytes are altered (first request only / every
    request). `requests` logs (path, Range header) of every GET.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corrupt_once: set[str] = set()
        self.corrupt_always: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                url_path = unquote(self.path.split("?", 1)[0])
                rel = url_path[len(server.url_path):] if url_path.startswith(server.url_path) else ""
                with server._lock:
                    server.requests.append((rel, self.headers.get("Range")))
                    corrupt = rel in server.corrupt_always or rel in server.corrupt_once
                    server.corrupt_once.discard(rel)
                path = server.root / rel
                if not rel or ".." in rel.split("/") or not path.is_file():
                    self.send_error(404)
                    return
                data = bytearray(path.read_bytes())
                if corrupt and data:
                    data[len(data) // 2] ^= 0xFF
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes=") and range_header.endswith("-"):
                    start = int(range_header[len("bytes="):-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(bytes(data[start:]))

        self.url_path = "/files/ptb-xl/1.0.3/"
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{self.url_path}"

    def __enter__(self) -> "MirrorServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def records_requested(server: MirrorServer) -> Iterator[str]:
    return (path for path, _ in server.requests if path.startswith("records"))
