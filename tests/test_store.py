"""SliceStore: random access by memory map, metadata/labels, units committed exactly once, atomic shards."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from dompre.data.store import SliceStore, StoreWriter

S = 8


def item(v: int) -> np.ndarray:
    return np.full((3, S, S), v, np.uint8)


def write(path, units: dict[str, int], start: int = 0, **kw) -> int:
    """Units name -> item count; item values run on from ``start``; returns the next value."""
    v = start
    with StoreWriter(path, image_size=S, **kw) as w:
        for key, n in units.items():
            if w.is_done(key):
                continue
            for _ in range(n):
                w.add(item(v), meta={"series_uid": key, "z": float(v)})
                v += 1
            w.commit_unit(key, info={"status": "ok"})
    return v


def test_random_access_meta_and_dataset(tmp_path):
    write(tmp_path, {"a": 3, "b": 4, "c": 2}, shard_size=4)
    st = SliceStore(tmp_path)
    assert len(st) == 9
    assert len(list((tmp_path / "shards").glob("*.npy"))) == 2   # shards hold whole units: [a, b] [c]
    for i in [0, 5, 8, -1]:
        assert st[i].shape == (3, S, S) and st[i][0, 0, 0] == (i % 9)
    idx = [8, 0, 5, 3, 5]
    np.testing.assert_array_equal(st.images(idx)[:, 0, 0, 0], idx)
    assert list(st.meta["series_uid"]) == ["a"] * 3 + ["b"] * 4 + ["c"] * 2
    assert set(st.meta.columns) >= {"source", "series_uid", "patient", "z", "spacing", "window", "split",
                                    "lesion_idx", "bbox"}
    assert (st.meta["lesion_idx"] == -1).all() and st.meta["bbox"].iloc[0] == ()
    assert st.labels is None and st.label_names is None
    with pytest.raises(IndexError):
        st[9]
    ds = st.dataset(indices=[2, 7], transform=lambda t: t.float())
    sample = ds[1]
    assert len(ds) == 2 and sample["index"] == 7 and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (0,)
    batch = next(iter(torch.utils.data.DataLoader(st.dataset(), batch_size=4)))
    assert batch["image"].shape == (4, 3, S, S) and batch["image"].dtype == torch.uint8
    shard = st._shard(0)
    assert isinstance(shard, np.memmap)           # images are memory-mapped, not loaded
    assert pickle.loads(pickle.dumps(st))._maps == {}


def test_labels_nan_unknown(tmp_path):
    with StoreWriter(tmp_path, image_size=S, label_names=["liver", "lung"]) as w:
        w.add(item(1), meta={"split": "train", "lesion_idx": 4, "bbox": (1, 2, 3, 4)}, labels=[1, np.nan])
        w.add(item(2))
        w.commit_unit("u")
        with pytest.raises(ValueError, match="labels must have shape"):
            w.add(item(3), labels=[1.0])
    st = SliceStore(tmp_path)
    np.testing.assert_array_equal(st.labels, [[1, np.nan], [np.nan, np.nan]])
    assert st.label_names == ["liver", "lung"]
    assert st.meta["bbox"].iloc[0] == (1, 2, 3, 4) and st.meta["split"].iloc[0] == "train"
    assert torch.isnan(st.dataset()[1]["label"]).all()


def test_add_rejects_wrong_shape_and_unlabeled_labels(tmp_path):
    with StoreWriter(tmp_path, image_size=S) as w:
        with pytest.raises(ValueError, match="expected uint8"):
            w.add(np.zeros((3, S, S), np.float32))
        with pytest.raises(ValueError, match="no label_names"):
            w.add(item(0), labels=[1.0])


def test_failed_job_keeps_finished_units_and_resume_is_exactly_once(tmp_path):
    ref = tmp_path / "ref"
    write(ref, {k: 3 for k in "abcde"}, shard_size=2)
    st = tmp_path / "st"
    with pytest.raises(RuntimeError):
        with StoreWriter(st, image_size=S, shard_size=2) as w:
            v = 0
            for key in "abc":
                for _ in range(3):
                    w.add(item(v), meta={"series_uid": key, "z": float(v)})
                    v += 1
                if key == "c":
                    raise RuntimeError("killed while unit c was half written")
                w.commit_unit(key)
    partial = SliceStore(st)
    assert sorted(partial.units) == ["a", "b"] and len(partial) == 6
    write(st, {k: 3 for k in "abcde"}, start=6, shard_size=2)
    done, fresh = SliceStore(st), SliceStore(ref)
    assert len(done) == len(fresh) == 15
    assert sorted(done.meta["series_uid"]) == sorted(fresh.meta["series_uid"])
    np.testing.assert_array_equal(np.sort(done.images(range(15))[:, 0, 0, 0]), np.arange(15))
    with StoreWriter(st, image_size=S) as w:
        with pytest.raises(KeyError, match="already committed"):
            w.commit_unit("a")


def test_leftover_tmp_and_unlisted_shard_are_ignored(tmp_path):
    write(tmp_path, {"a": 2}, shard_size=1)
    shards = tmp_path / "shards"
    (shards / "shard-000001.npy.tmp").write_bytes(b"half a shard")
    np.save(shards / "shard-000001.npy", np.zeros((5, 3, S, S), np.uint8))  # renamed, manifest not yet updated
    (tmp_path / "manifest.json.tmp").write_text("{ broken")
    st = SliceStore(tmp_path)
    assert len(st) == 2
    write(tmp_path, {"a": 2, "b": 1}, start=2, shard_size=1)
    assert not (shards / "shard-000001.npy.tmp").exists()
    st = SliceStore(tmp_path)
    assert len(st) == 3 and st[2][0, 0, 0] == 2


def test_skipped_unit_recorded_without_items(tmp_path):
    with StoreWriter(tmp_path, image_size=S) as w:
        w.commit_unit("bad", info={"status": "skipped", "reason": "too short"})
    st = SliceStore(tmp_path)
    assert len(st) == 0 and st.units["bad"]["reason"] == "too short"
    assert len(st.meta) == 0 and "series_uid" in st.meta.columns


def test_resume_with_other_settings_refused(tmp_path):
    write(tmp_path, {"a": 1}, info={"prep": {"size": 8}})
    with pytest.raises(ValueError, match="use a new STORE_DIR"):
        StoreWriter(tmp_path, image_size=S, info={"prep": {"size": 16}})
    with pytest.raises(FileNotFoundError, match="not a SliceStore"):
        SliceStore(tmp_path / "nothing")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["units"]["a"]["n"] == 1


def test_reader_keeps_a_bounded_number_of_shards_mapped(tmp_path):
    from dompre.data.store import MAX_OPEN_SHARDS
    n_units = MAX_OPEN_SHARDS * 3
    write(tmp_path / "s", {f"u{i}": 2 for i in range(n_units)}, shard_size=2)  # one shard per unit
    store = SliceStore(tmp_path / "s")
    assert [int(store[i][0, 0, 0]) for i in range(len(store))] == list(range(2 * n_units))
    assert len(store._maps) == MAX_OPEN_SHARDS  # a full pass leaves only the most recent shards mapped
    np.testing.assert_array_equal(store.images([0, 2 * n_units - 1, 1])[:, 0, 0, 0], [0, 2 * n_units - 1, 1])
    assert 0 in store._maps and len(store._maps) == MAX_OPEN_SHARDS
    assert len(pickle.loads(pickle.dumps(store.dataset()))[3]["image"]) == 3  # workers reopen maps after pickling
