"""SliceStore: random access by memory map, metadata/labels, units committed exactly once, atomic shards."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dompre.data.store import SliceStore, StoreWriter
from dompre.train.engine import Items, batch_loader

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
    sample = Items(st, transform=lambda t: t.float())[7]
    assert sample["index"] == 7 and sample["image"].dtype == torch.float32 and "target" not in sample
    batch = next(iter(batch_loader(Items(st), [8, 0, 5, 3], 4)))  # one batched read (Items.__getitems__)
    assert batch["image"].shape == (4, 3, S, S) and batch["image"].dtype == torch.uint8
    assert batch["index"].tolist() == [8, 0, 5, 3] and batch["image"][:, 0, 0, 0].tolist() == [8, 0, 5, 3]
    assert st.units["a"] == {"status": "ok", "n": 3} and st.labels is None
    clone = pickle.loads(pickle.dumps(st))
    assert clone._files.fds == {} and clone._cache == {}   # workers get offsets only: no files, columns or units
    assert clone[5][0, 0, 0] == 5


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
    assert torch.isnan(Items(st, st.labels)[1]["target"]).all()


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
    assert SliceStore(tmp_path).units["a"]["n"] == 1


def test_reader_keeps_a_bounded_number_of_files_open_and_maps_nothing(tmp_path):
    n_units = 12
    write(tmp_path / "s", {f"u{i}": 2 for i in range(n_units)}, shard_size=2)  # one shard per unit
    store = SliceStore(tmp_path / "s")
    store._files.max_open = 3
    assert [int(store[i][0, 0, 0]) for i in range(len(store))] == list(range(2 * n_units))
    assert len(store._files.fds) == 3 and sorted(store._files.fds) == [9, 10, 11]  # the most recent shards stay open
    np.testing.assert_array_equal(store.images([0, 2 * n_units - 1, 1, 0])[:, 0, 0, 0], [0, 2 * n_units - 1, 1, 0])
    maps = open("/proc/self/maps").read()
    assert "shard-000000.npy" not in maps and len(store._files.fds) == 3  # positioned reads, no memory maps
    assert len(pickle.loads(pickle.dumps(Items(store)))[3]["image"]) == 3  # workers reopen files after pickling
    store.close()
    assert store._files.fds == {} and store[4][0, 0, 0] == 4


def test_damaged_shard_is_named(tmp_path):
    write(tmp_path, {"a": 2, "b": 2}, shard_size=2)
    f = tmp_path / "shards" / "shard-000001.npy"
    f.write_bytes(f.read_bytes()[:-5])
    st = SliceStore(tmp_path)
    assert st[0][0, 0, 0] == 0
    with pytest.raises(ValueError, match="shard-000001.npy.*damaged"):
        st[2]


def test_commit_appends_one_log_line_and_close_compacts(tmp_path):
    w = StoreWriter(tmp_path, image_size=S, shard_size=2)
    for k in range(6):
        w.add(item(k), meta={"series_uid": f"u{k}"})
        w.commit_unit(f"u{k}", info={"status": "ok"})
        if k == 1:
            manifest = (tmp_path / "manifest.json").read_bytes()
    w.commit_unit("skipped", info={"status": "skipped"})
    w.flush()
    log = (tmp_path / "log-0.jsonl").read_bytes().splitlines()
    assert len(log) == 4 and (tmp_path / "manifest.json").read_bytes() == manifest  # commits never rewrite it
    assert b"u4" in log[2] and b"u0" not in log[2] and b'"shard": null' in log[3]  # each line: its own units
    mid = SliceStore(tmp_path)  # a reader while the writer runs sees every committed unit
    assert len(mid) == 6 and sorted(mid.units) == ["skipped"] + [f"u{k}" for k in range(6)]
    w.close()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["generation"] == 1 and len(m["shards"]) == 3 and "units" not in m
    assert not (tmp_path / "log-0.jsonl").exists() and (tmp_path / "units-1.jsonl").is_file()
    write(tmp_path, {"u9": 1}, start=6, shard_size=2)
    st = SliceStore(tmp_path)
    assert len(st) == 7 and st.units["u9"]["n"] == 1 and st.units["skipped"]["status"] == "skipped"
    assert not (tmp_path / "units-1.jsonl").exists()


def test_torn_log_line_is_not_a_commit_and_is_cut_by_the_next_writer(tmp_path):
    w = StoreWriter(tmp_path, image_size=S, shard_size=1)
    for k in range(2):
        w.add(item(k))
        w.commit_unit(f"u{k}")
    log = tmp_path / "log-0.jsonl"
    whole = log.read_bytes()
    with open(log, "ab") as f:  # a commit killed half-way through its line (its shard file is there)
        f.write(whole.splitlines()[1][:25])
    st = SliceStore(tmp_path)
    assert len(st) == 2 and sorted(st.units) == ["u0", "u1"]
    w.abort()
    write(tmp_path, {"u0": 1, "u1": 1, "u2": 1}, start=2, shard_size=1)
    st = SliceStore(tmp_path)
    assert len(st) == 3 and [int(st[i][0, 0, 0]) for i in range(3)] == [0, 1, 2]


KILL_CHILD = """
import sys, time
import numpy as np
from dompre.data.store import StoreWriter
with StoreWriter(sys.argv[1], image_size=8, shard_size=3) as w:
    for k in range(1000):
        if w.is_done(f"u{k}"):
            continue
        for j in range(2):
            w.add(np.full((3, 8, 8), k % 250, np.uint8), meta={"series_uid": f"u{k}", "z": float(j)})
            time.sleep(0.002)
        w.commit_unit(f"u{k}", info={"k": k})
"""


def test_kill_9_writer_then_resume_is_exactly_once(tmp_path):
    st = tmp_path / "st"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(st)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and child.poll() is None:
        log = st / "log-0.jsonl"
        if log.is_file() and log.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    partial = SliceStore(st)
    done = len(partial.units)
    assert 4 <= done < 1000 and len(partial) == 2 * done
    np.testing.assert_array_equal(partial.columns(["series_uid"])["series_uid"].to_numpy(),
                                  np.repeat([f"u{k}" for k in range(done)], 2))
    with StoreWriter(st, image_size=S, shard_size=3) as w:
        assert w.is_done("u0") and not w.is_done(f"u{done}")
        for k in range(done, done + 5):
            for j in range(2):
                w.add(item(k % 250), meta={"series_uid": f"u{k}", "z": float(j)})
            w.commit_unit(f"u{k}")
    final = SliceStore(st)
    uids = final.columns(["series_uid"])["series_uid"].tolist()
    assert uids == list(np.repeat([f"u{k}" for k in range(done + 5)], 2))  # every unit once, in order
    np.testing.assert_array_equal(final.images(range(len(final)))[::2, 0, 0, 0], np.arange(done + 5) % 250)


def _write_v1_store(path, n_units: int) -> None:
    """A store exactly as dompre wrote it before version 2: units in manifest.json, metadata as JSON lines."""
    from dompre.data.store import _npy_header
    shards = path / "shards"
    shards.mkdir(parents=True)
    entries = []
    for k in range(n_units):
        name = f"shard-{k:06d}"
        with open(shards / f"{name}.npy", "wb") as f:
            f.write(_npy_header((2, 3, S, S)) + np.stack([item(2 * k), item(2 * k + 1)]).tobytes())
        rows = [{"source": "", "series_uid": f"u{k}", "patient": "", "z": float("nan"), "spacing": [],
                 "window": [], "split": "train", "lesion_idx": -1, "bbox": [1, 2, 3, 4]}] * 2
        (shards / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        np.save(shards / f"{name}.labels.npy", np.array([[1, np.nan]] * 2, np.float32))
        entries.append({"name": name, "n": 2})
    units = {f"u{k}": {"status": "ok", "n": 2} for k in range(n_units)}
    (path / "manifest.json").write_text(json.dumps({"version": 1, "image_size": S, "label_names": ["a", "b"],
                                                    "info": {}, "shards": entries, "units": units}))


def test_version_1_store_opens_and_resumes(tmp_path):
    _write_v1_store(tmp_path, 2)
    st = SliceStore(tmp_path)
    assert len(st) == 4 and st[3][0, 0, 0] == 3 and sorted(st.units) == ["u0", "u1"]
    assert st.meta["bbox"].iloc[0] == (1, 2, 3, 4) and st.item_meta(2)["series_uid"] == "u1"
    np.testing.assert_array_equal(st.labels[:, 0], [1, 1, 1, 1])
    with StoreWriter(tmp_path, image_size=S, label_names=["a", "b"]) as w:
        assert w.is_done("u1")
        w.add(item(4), meta={"series_uid": "u2", "bbox": (5, 6, 7, 8)}, labels=[0, 1])
        w.commit_unit("u2")
    st = SliceStore(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["version"] == 2
    assert len(st) == 5 and sorted(st.units) == ["u0", "u1", "u2"]
    assert st.columns(["series_uid"])["series_uid"].tolist() == ["u0", "u0", "u1", "u1", "u2"]
    assert st.meta["bbox"].tolist() == [(1, 2, 3, 4)] * 4 + [(5, 6, 7, 8)] and st.labels[4, 1] == 1


def test_shard_name_outside_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    _write_v1_store(outside, 1)  # a real shard a manifest could point at
    store = tmp_path / "a" / "b"
    write(store, {"u": 1})
    m = json.loads((store / "manifest.json").read_text())
    for bad in ["../../outside/shards/shard-000000", "/etc/passwd", "..", "x/../../y"]:
        m["shards"] = [{"name": bad, "n": 2}]
        (store / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ValueError, match="is not a file of"):
            SliceStore(store)
        with pytest.raises(ValueError, match="is not a file of"):
            StoreWriter(store, image_size=S)


def test_metadata_columns_on_demand_and_one_item(tmp_path):
    with StoreWriter(tmp_path, image_size=S, shard_size=2) as w:
        for k in range(5):
            w.add(item(k), meta={"series_uid": f"s{k}", "z": k / 2, "bbox": (k, 1, 2, 3),
                                 "extra": k if k % 2 else f"t{k}", "d": {"a": k} if k else {"b": 1}},
                  labels=None)  # mixed types and dicts: kept as JSON
            w.commit_unit(f"u{k}")
    st = SliceStore(tmp_path)
    z = st.columns(["z"])
    assert list(z.columns) == ["z"] and z["z"].tolist() == [0, 0.5, 1, 1.5, 2]
    assert set(st._cache) == {"col:z"}  # nothing else was read
    assert st.item_meta(3) == {**dict(st.meta.iloc[3]), "bbox": (3, 1, 2, 3)}
    assert st.item_meta(3)["extra"] == 3 and st.item_meta(4)["extra"] == "t4"
    assert st.meta["extra"].tolist() == ["t0", 1, "t2", 3, "t4"] and "extra" in st.column_names()
    assert st.item_meta(0)["d"] == {"b": 1} and st.item_meta(2)["d"] == {"a": 2}
    assert st.columns(["not_a_column"])["not_a_column"].isna().all()


def test_keys_some_items_lack_read_back_as_missing(tmp_path):
    with StoreWriter(tmp_path, image_size=S, shard_size=10) as w:
        for k, meta in enumerate([{}, {"late": 1.5}, {}, {"late": 2.5, "tags": ["a", "b"]}]):
            w.add(item(k), meta=meta)
            w.commit_unit(f"u{k}")
    st = SliceStore(tmp_path)
    assert np.isnan(st.meta["late"][[0, 2]]).all() and st.meta["late"][[1, 3]].tolist() == [1.5, 2.5]
    assert st.meta["tags"].tolist() == [None, None, None, ("a", "b")]


def test_waiting_items_add_nothing_the_garbage_collector_walks(tmp_path):
    """A shard's waiting metadata (lists, arrays) is held as untracked tuples, so it triggers no full collections
    (each one walks every object of the process: a pause that would land in some commits and not others)."""
    import gc

    w = StoreWriter(tmp_path, image_size=S, shard_size=10_000)
    gc.collect()
    before = len(gc.get_objects())
    for k in range(2000):
        w.add(item(0), meta={"series_uid": f"s{k}", "spacing": [1.0, 0.7, 0.7], "bbox": np.arange(4.0)})
        w.commit_unit(f"u{k}", info={"status": "ok"})
    gc.collect()
    assert len(gc.get_objects()) - before < 100  # was 2 per item (its dict and its list)
    w.close()
    assert SliceStore(tmp_path).item_meta(1999)["bbox"] == (0.0, 1.0, 2.0, 3.0)


def test_label_columns_and_one_item_labels_without_the_whole_matrix(tmp_path):
    rng = np.random.default_rng(0)
    lab = np.where(rng.random((7, 4)) < 0.3, np.nan, (rng.random((7, 4)) < 0.5).astype(np.float32))
    with StoreWriter(tmp_path, image_size=S, label_names=list("abcd"), shard_size=3) as w:
        for k in range(7):
            w.add(item(k), labels=lab[k])
            w.commit_unit(f"u{k}")
    st = SliceStore(tmp_path)
    sub = st.label_columns([3, 1])
    assert sub.dtype == np.float32 and "labels" not in st._cache  # read per shard, the full matrix not kept
    np.testing.assert_array_equal(sub, lab[:, [3, 1]])
    np.testing.assert_array_equal(st.item_labels(5), lab[5])
    np.testing.assert_array_equal(st.item_labels(-1), lab[6])
    assert "labels" not in st._cache
    np.testing.assert_array_equal(st.label_columns([0]), st.labels[:, [0]])  # from the cache once it exists
    write(tmp_path / "unlabeled", {"u": 1})
    assert SliceStore(tmp_path / "unlabeled").item_labels(0) is None
