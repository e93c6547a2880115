"""Beat maps and the public rhythm table: what a rhythm-conditioned model reads and where sampling draws it from."""

import hashlib

import numpy as np
import pytest
import torch

from common.config import ConfigError, DiffusionConfig, ModelConfig, from_dict
from common.diffusion import GaussianDiffusion
from common.model.denoiser import build_denoiser
from common.rhythm import (
    RHYTHM_CODES,
    RhythmTable,
    beat_map,
    beat_maps,
    record_beats,
    require_public_pool,
    rhythm_keys,
)
from common.scp import SCP_CODES

FS = 100


def labels_with(*codes: str) -> np.ndarray:
    row = np.zeros((1, 71), np.float32)
    for code in codes:
        row[0, SCP_CODES.index(code)] = 1.0
    return row


def spiky_records(periods: list[int], length: int = 1000) -> np.ndarray:
    """[N, 8, L] mV: a narrow 1.5 mV spike every `period` samples in every lead, on a flat line."""
    out = np.zeros((len(periods), 8, length))
    grid = np.arange(length)
    for i, period in enumerate(periods):
        for peak in range(period // 2, length, period):
            out[i] += 1.5 * np.exp(-0.5 * ((grid - peak) / 1.5) ** 2)
    return out


def test_a_beat_map_has_a_unit_bump_at_each_beat_and_nothing_between():
    peaks = np.array([100, 250.5, 999])
    mapped = beat_map(peaks, 1000)
    assert mapped.shape == (1000,) and mapped.dtype == np.float32
    assert mapped[100] == pytest.approx(1.0) and mapped[999] == pytest.approx(1.0)
    assert mapped[250] == mapped[251] > 0.9  # a fractional beat sits between two samples
    assert mapped[175] < 1e-6 and beat_map(np.array([]), 50).sum() == 0
    assert beat_maps([peaks, np.array([5])], 1000).shape == (2, 1, 1000)


def test_the_table_keeps_each_records_rate_and_regularity():
    labels = np.concatenate([labels_with("SR"), labels_with("STACH")])
    table = RhythmTable.from_beats(record_beats(spiky_records([100, 60]), FS), labels, FS)
    assert table.keys == (("SR",), ("STACH",))
    np.testing.assert_allclose(table.mean_rr_s, [1.0, 0.6], atol=0.02)
    assert (table.rr_cv < 0.02).all()
    with pytest.raises(ValueError, match="no record with at least 3"):
        RhythmTable.from_beats(record_beats(np.zeros((2, 8, 1000)), FS), np.zeros((2, 71)), FS)
    with pytest.raises(ValueError, match="2 beat lists for 1 label rows"):
        RhythmTable.from_beats(record_beats(spiky_records([100, 60]), FS), labels[:1], FS)


def test_draws_follow_the_requested_rhythm_statements():
    table = RhythmTable(FS, (("SR",), ("AFIB",), ("SR", "PVC")), np.array([1.0, 0.6, 0.8]), np.array([0.0, 0.25, 0.0]))
    rng = np.random.default_rng(0)
    sinus = table.draw(np.repeat(labels_with("SR"), 5, axis=0), 1000, rng)
    for beats in sinus:  # only the SR record: exactly regular at 60 bpm, from a random phase
        np.testing.assert_allclose(np.diff(beats), 100.0)
        assert 0 <= beats[0] < 100 and beats[-1] < 1000
    afib = table.draw(np.repeat(labels_with("AFIB"), 20, axis=0), 1000, rng)
    assert np.median([np.std(np.diff(b)) / np.mean(np.diff(b)) for b in afib]) > 0.1  # irregular
    assert all(np.diff(b).min() >= 30 - 1e-9 for b in afib)  # never faster than the plausible 0.3 s
    # a key no public record has falls back to the records sharing its first statement, then to all
    shared = table.draw(np.repeat(labels_with("SR", "SARRH"), 30, axis=0), 1000, rng)
    assert {round(float(np.median(np.diff(b)))) for b in shared} <= {100, 80}
    assert len(table.draw(labels_with("PACE"), 1000, rng)) == 1
    assert rhythm_keys(labels_with("PVC", "SR")) == [("SR", "PVC")]  # RHYTHM_CODES order


def test_the_table_round_trips_and_refuses_another_file(tmp_path):
    table = RhythmTable(FS, (("SR",), ()), np.array([0.85, 1.1]), np.array([0.03, 0.2]))
    path = tmp_path / "rhythm.json"
    path.write_bytes(table.to_bytes())
    again = RhythmTable.read(path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert again.keys == table.keys and np.allclose(again.mean_rr_s, table.mean_rr_s)
    with pytest.raises(ValueError, match="sha256 differs"):
        RhythmTable.read(path, "0" * 64)
    data = table.to_dict()
    with pytest.raises(ValueError, match="not a fedecg-rhythm/1 table"):
        RhythmTable.from_dict({**data, "codes": list(RHYTHM_CODES[:-1])})
    with pytest.raises(ValueError, match="unknown rhythm code"):
        RhythmTable.from_dict({**data, "records": [{"key": ["NORM"], "mean_rr_s": 1.0, "rr_cv": 0.0}]})
    with pytest.raises(ValueError, match="mean RR must be positive"):
        RhythmTable.from_dict({**data, "records": [{"key": [], "mean_rr_s": 0.0, "rr_cv": 0.0}]})


def test_only_a_rhythm_conditioned_unet_takes_a_beat_map_and_it_needs_one():
    model = build_denoiser(ModelConfig(size="unet", channels=8, rhythm=True))
    plain = build_denoiser(ModelConfig(size="unet", channels=8))
    x, t = torch.randn(2, 8, 1000), torch.tensor([3, 7])
    labels, demographics = torch.zeros(2, 71), torch.zeros(2, 8)
    beats = torch.from_numpy(beat_maps([np.array([50.0, 150.0])] * 2, 1000))
    assert model(x, t, labels, demographics, rhythm=beats).shape == (2, 8, 1000)
    with pytest.raises(ValueError, match="needs rhythm"):
        model(x, t, labels, demographics)
    with pytest.raises(ValueError, match="needs rhythm"):
        plain(x, t, labels, demographics, rhythm=beats)
    with pytest.raises(ValueError, match=r"rhythm must be \[B, 1, L\]"):
        model(x, t, labels, demographics, rhythm=beats[:, :, :500])
    with pytest.raises(ConfigError, match="rhythm conditioning needs size unet"):
        from_dict({"model": {"size": "tiny", "rhythm": True}})
    # the beat map reaches the network: a stem that reads it changes the answer
    with torch.no_grad():
        model.unpatchify.weight.normal_()
        other = torch.from_numpy(beat_maps([np.array([500.0])] * 2, 1000))
        assert not torch.allclose(model(x, t, labels, demographics, rhythm=beats),
                                  model(x, t, labels, demographics, rhythm=other))


def test_training_and_sampling_hand_the_beat_map_to_the_model():
    seen = []

    class Recorder(torch.nn.Module):
        in_channels = 8

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))  # the sampler reads its dtype

        def forward(self, x, t, labels, demographics, cond_keep=None, rhythm=None):
            seen.append(None if rhythm is None else rhythm.clone())
            return torch.zeros_like(x)

    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=10, sample_steps=2))
    beats = torch.from_numpy(beat_maps([np.array([10.0]), np.array([60.0])], 100))
    x0, labels, demographics = torch.randn(2, 8, 100), torch.zeros(2, 71), torch.zeros(2, 8)
    diffusion.training_losses(Recorder(), x0, labels, demographics, noise_multiplicity=2, rhythm=beats)
    torch.testing.assert_close(seen[-1], beats.repeat_interleave(2, dim=0))  # example-major, like the rows
    diffusion.sample(Recorder(), labels, demographics, length=100, rhythm=beats, guidance_scale=2.0)
    torch.testing.assert_close(seen[-1], torch.cat([beats, beats]))  # kept in the unconditional half too
    with pytest.raises(ValueError, match="rhythm must be"):
        diffusion.sample(Recorder(), labels, demographics, length=100, rhythm=beats[:1])


def test_rhythm_conditioning_is_refused_outside_public_pretraining():
    require_public_pool(False, "a federation")
    with pytest.raises(ValueError, match="only public pretraining .* not a federation"):
        require_public_pool(True, "a federation")
