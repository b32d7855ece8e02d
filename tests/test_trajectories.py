"""Trajectory recording: x_t per step with batch offsets, features via hooks, float16, spill to disk, selection."""

import numpy as np
import pytest
import torch

from bench.errors import UsageError
from bench.models.sampling import initial_noise
from eda.trajectories import CalibSet, Trajectories, mid_attention_name, record_trajectories

torch.set_num_threads(2)


def test_record_select_and_features(tiny_model):
    mid = mid_attention_name(tiny_model.unet)
    assert mid == "mid_block.attentions.0"
    tr = record_trajectories(tiny_model, n=6, seed=3, feature_modules=(mid, f"{mid}@output"), batch_size=4)
    S = tr.steps
    assert S == 5 and tr.xs.shape == (5, 6, 1, 8, 8) and tr.cond is None
    assert torch.equal(tr.xs[0], initial_noise(6, (1, 8, 8), 3))  # index 0 = x_T, both batches placed by offset
    assert (tr.ts[:-1] >= tr.ts[1:]).all()  # noisiest first
    # x_t recorded = what the sampler fed the UNet: replay one step
    with torch.no_grad():
        feat = tr.features[mid]
        assert feat.shape[:2] == (5, 6)
        hs = []
        h = tiny_model.unet.get_submodule(mid).register_forward_hook(lambda m, a, o: hs.append(a[0]))
        tiny_model.unet(tr.xs[2], torch.full((6,), int(tr.ts[2])))
        h.remove()
        assert torch.allclose(hs[0], feat[2], atol=1e-5)
    assert tr.features[f"{mid}@output"].shape == feat.shape
    cs = tr.select(torch.tensor([0, -1, 4, 2, -1, 1]))
    assert isinstance(cs, CalibSet) and len(cs) == 4
    assert torch.equal(cs.xs[1], tr.xs[4, 2]) and cs.ts.tolist() == [int(tr.ts[s]) for s in (0, 4, 2, 1)]
    cp = tr.select_pairs([1, 1], [5, 0])
    assert torch.equal(cp.xs[0], tr.xs[1, 5]) and len(list(cp.batches(1))) == 2
    assert len(tr.all_steps()) == 30
    with pytest.raises(UsageError):
        tr.select(torch.zeros(3, dtype=torch.long))
    with pytest.raises(UsageError):
        record_trajectories(tiny_model, n=2, seed=0, feature_modules=("no.such.module",))


def test_float16_spill_and_save_load(tiny_cond_model, tmp_path):
    tr = record_trajectories(tiny_cond_model, n=3, seed=1, dtype=torch.float16, max_bytes=100,
                             spill_dir=tmp_path / "spill", feature_modules=(mid_attention_name(tiny_cond_model.unet),))
    assert tr.xs.dtype == torch.float16
    assert (tmp_path / "spill" / "xs.npy").is_file()  # memmapped on disk above max_bytes
    assert np.load(tmp_path / "spill" / "xs.npy", mmap_mode="r").shape == (5, 3, 4, 8, 8)
    assert tr.cond is not None and tr.cond["encoder_hidden_states"].shape == (3, 3, 16)
    ref = record_trajectories(tiny_cond_model, n=3, seed=1)
    assert torch.allclose(tr.xs.float(), ref.xs, rtol=2e-3, atol=2e-3)  # float16 storage of the same run
    cs = tr.select(torch.tensor([0, 2, 4]))
    assert cs.cond["encoder_hidden_states"].shape == (3, 3, 16) and cs.xs.dtype == torch.float32
    tr.save(tmp_path / "saved")
    back = Trajectories.load(tmp_path / "saved")
    assert torch.equal(back.xs, tr.xs) and torch.equal(back.ts, tr.ts) and back.sampler == tr.sampler
    assert set(back.features) == set(tr.features)
    assert torch.equal(back.cond["encoder_hidden_states"], tr.cond["encoder_hidden_states"])
