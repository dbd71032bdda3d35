"""Batch mixing of the student: labeled_batch + pseudo_batch inputs, pseudo part from the unlabeled store."""
import json

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dompre.data.store import SliceStore, StoreWriter
from dompre.train.config import PseudoConfig, StudentConfig
from dompre.train.engine import StreamSampler
from dompre.train.pseudo_label import PseudoLabels, write_chunk
from dompre.train.student import (DeviceNoise, NoisyStudentTask, build_loaders, mix_batches, noise_params,
                                  noise_transform, pseudo_rows)

NAMES = ["chest", "lung", "liver"]


def _store(path, n, value, labels=None):
    with StoreWriter(path, image_size=16, label_names=NAMES if labels is not None else None) as w:
        for i in range(n):
            img = np.full((3, 16, 16), value, np.uint8)
            img[0, 0, 0] = i  # row id in the pixels
            w.add(img, meta={"split": "train"}, labels=None if labels is None else labels[i])
        w.commit_unit("all")
    return SliceStore(path)


@pytest.fixture()
def stores(tmp_path):
    lab = np.tile(np.array([[1, 0, np.nan]], np.float32), (10, 1))
    labeled = _store(tmp_path / "lab", 10, 10, lab)
    unlabeled = _store(tmp_path / "unl", 20, 200)
    # pseudo-labels: even rows -> 'liver' (0.9); odd rows -> nothing above threshold
    idx = np.tile(np.array([[2, 0, 1]], np.int16), (20, 1))
    prob = np.tile(np.array([[0.9, 0.2, 0.1]], np.float16), (20, 1))
    prob[1::2, 0] = 0.3
    write_chunk(tmp_path / "pl", 0, 20, idx, prob)
    (tmp_path / "pl" / "index.json").write_text(json.dumps({"num_inputs": 20, "chunk_size": 32, "top_k": 3,
                                                            "label_names": NAMES}))
    return labeled, unlabeled, PseudoLabels(tmp_path / "pl")


def test_pseudo_rows_drop_empty_and_targets(stores):
    _, _, pl = stores
    rows, targets, weights, summary = pseudo_rows(pl, PseudoConfig(unkept="negative"), None)
    np.testing.assert_array_equal(rows, np.arange(0, 20, 2))
    np.testing.assert_array_equal(targets[4], [0, 0, 1])
    assert weights is None and summary["used"] == 10 and summary["empty"] == 10


def test_mixed_batch_sizes_sources_and_mask(stores):
    labeled, unlabeled, pl = stores
    rows, targets, _, _ = pseudo_rows(pl, PseudoConfig(unkept="negative"), None)
    data = build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=0,
                         unlabeled_store=unlabeled, pseudo_rows_=rows, pseudo_targets=targets, pseudo_batch=3)
    assert data.steps_per_epoch == 2
    batches = list(zip(*data.loaders))
    assert len(batches) == 2
    for lab, pse in batches:
        mixed = mix_batches(lab, pse)
        assert mixed["image"].shape == (7, 3, 16, 16)
        np.testing.assert_array_equal(mixed["is_pseudo"].numpy(), [0, 0, 0, 0, 1, 1, 1])
        img = mixed["image"][:, 1]
        assert (img[~mixed["is_pseudo"]] == 10).all() and (img[mixed["is_pseudo"]] == 200).all()
        ids = mixed["image"][mixed["is_pseudo"], 0, 0, 0].numpy()
        assert set(ids) <= set(rows.tolist())  # only rows with a kept pseudo-label
        np.testing.assert_array_equal(mixed["target"][mixed["is_pseudo"]].numpy(), [[0, 0, 1]] * 3)
        assert torch.isnan(mixed["target"][~mixed["is_pseudo"], 2]).all()


def test_stream_sampler_epochs_continue_the_pseudo_stream():
    s = StreamSampler(np.arange(5), per_epoch=3, seed=1, stage=0)
    seen = []
    for e in range(5):
        s.set_epoch(e)
        seen += [r for r, _ in s]
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    s.set_epoch(1)
    assert [r for r, _ in s] == seen[3:6]  # same epoch, same items (resume)


def test_noise_is_seeded_per_item(stores):
    labeled, _, _ = stores
    from dompre.train.engine import Items
    ds = Items(labeled, labeled.labels, noise_transform(StudentConfig(), 12))
    a, b, c = ds[(3, 7)]["image"], ds[(3, 7)]["image"], ds[(3, 8)]["image"]
    assert a.shape == (3, 12, 12) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another stream position, other noise


def test_task_loss_is_labeled_plus_weighted_pseudo():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    loss = lambda logits, t: torch.nan_to_num(t, 0.0).sum() * 0 + logits.mean()  # noqa: E731
    task = NoisyStudentTask(model, loss, prep=lambda x: x.float(), pseudo_weight=0.5)
    lab = {"image": torch.ones(2, 3, 4, 4, dtype=torch.uint8), "target": torch.zeros(2, 3)}
    pse = {"image": torch.zeros(5, 3, 4, 4, dtype=torch.uint8), "target": torch.ones(5, 3)}
    out = task(lab, pse)
    assert out["loss"].item() == pytest.approx(out["labeled_loss"].item() + 0.5 * out["pseudo_loss"].item())
    with pytest.raises(ValueError, match="label set"):
        mix_batches(lab, {"image": pse["image"], "target": torch.ones(5, 4)})


def _ramps(h: int) -> torch.Tensor:
    """Three distinct smooth channels in [40, 200], so crops, angles, grayscale and auto-contrast all show."""
    yy, xx = np.mgrid[0:h, 0:h]
    img = np.stack([40 + 160 * xx / h, 40 + 160 * yy / h, 40 + 160 * np.hypot(xx - 8, yy - 20) / (1.5 * h)])
    return torch.from_numpy(img.clip(0, 255).astype(np.uint8))


def test_device_noise_gives_each_item_the_cpu_paths_noise():
    cfg, h, size = StudentConfig(), 32, 24
    cpu_noise, device_noise, img = noise_transform(cfg, size), DeviceNoise(size), _ramps(32)
    seeds = range(120)
    cpu = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # as Items seeds the CPU path
            cpu.append(cpu_noise(img).float())
    cpu = torch.stack(cpu)
    params = torch.from_numpy(np.stack([noise_params(cpu_noise, h, s) for s in seeds]))
    dev = device_noise(img.expand(len(seeds), -1, -1, -1), params)
    assert dev.shape == cpu.shape and dev.dtype == torch.float32
    cpu_gray = (cpu[:, 0] == cpu[:, 1]).all(-1).all(-1) & (cpu[:, 1] == cpu[:, 2]).all(-1).all(-1)
    np.testing.assert_array_equal(cpu_gray.numpy(), params[:, 5].numpy() == 1)  # same coin, item by item
    err = (dev - cpu).abs().mean((1, 2, 3))
    other = (dev - cpu.roll(1, 0)).abs().mean((1, 2, 3))  # each item against its neighbour's CPU noise
    assert err.max() < 6 and other.median() > 15  # same crop, angle and auto-contrast: only interpolation differs
    # the per-sample parameter distributions are the configured ones
    from scipy import stats
    many = np.stack([noise_params(cpu_noise, h, s) for s in range(2000)])
    assert stats.kstest(many[:, 4], stats.uniform(-cfg.rotate_degrees, 2 * cfg.rotate_degrees).cdf).pvalue > 1e-3
    for col, p in ((5, cfg.grayscale_p), (6, cfg.autocontrast_p)):
        assert abs(many[:, col].mean() - p) < 4 * np.sqrt(p * (1 - p) / len(many))
    area = many[:, 2] * many[:, 3] / h ** 2
    assert area.min() > cfg.crop_scale[0] - 0.05 and area.max() <= 1 and area.std() > 0.05


def test_device_loaders_read_uint8_and_carry_noise_parameters(stores):
    labeled, unlabeled, pl = stores
    rows, targets, _, _ = pseudo_rows(pl, PseudoConfig(unkept="negative"), None)
    noise = noise_transform(StudentConfig(), 12)
    data = build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=0,
                         transform=noise, unlabeled_store=unlabeled, pseudo_rows_=rows, pseudo_targets=targets,
                         pseudo_batch=3, augment_on="device")
    lab, pse = next(iter(zip(*data.loaders)))
    assert lab["image"].dtype == torch.uint8 and lab["image"].shape == (4, 3, 16, 16)  # as stored, not noised
    assert (lab["image"][:, 1] == 10).all() and (pse["image"][:, 1] == 200).all()
    seeds = [seed for _, seed in data.samplers[0]][:4]
    np.testing.assert_array_equal(lab["noise"].numpy(), [noise_params(noise, 16, s) for s in seeds])
    assert isinstance(data.noise, DeviceNoise) and data.noise.img_size == 12
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 3))
    seen = []
    task = NoisyStudentTask(model, lambda logits, t: logits.mean(), prep=lambda x: seen.append(x) or x / 255,
                            noise=data.noise)
    assert torch.isfinite(task(lab, pse)["loss"])
    assert seen[0].shape == (7, 3, 12, 12)
    cpu = build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=0,
                        transform=noise)
    assert cpu.noise is None and next(iter(cpu.loaders[0]))["image"].shape == (4, 3, 12, 12)  # default unchanged
    with pytest.raises(ValueError, match="augment_on=cpu"):
        build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=0,
                      transform=v2.Compose([v2.RandomHorizontalFlip()]), augment_on="device")


def test_loaders_with_workers_freeze_the_parent_heap_before_forking(stores):
    import gc
    labeled, _, _ = stores
    gc.unfreeze()
    build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=0)
    assert gc.get_freeze_count() == 0  # no workers, nothing forked: nothing frozen
    build_loaders(labeled, np.arange(10), labeled.labels, labeled_batch=4, seed=0, stage=1, num_workers=1)
    assert gc.get_freeze_count() > 0  # the objects that exist now are never scanned by a worker's collection
    gc.unfreeze()

def test_unkept_top_k_labels_negative_soft_or_ignored(stores):
    """Row 1 keeps nothing above 0.5 ('liver' 0.3): its top-k labels are 0, the teacher's probabilities or
    unknown (NaN, left out of the loss) by pseudo.unkept; a kept label is 1 in every mode."""
    pl = stores[2]
    got = {mode: pseudo_rows(pl, PseudoConfig(unkept=mode, drop_empty=False), None)[1] for mode in
           ("negative", "soft", "ignore")}
    for mode, t in got.items():
        assert t[0][2] == 1.0, mode                                  # kept 'liver' of an even row
    np.testing.assert_array_equal(got["negative"][1], [0, 0, 0])
    np.testing.assert_allclose(got["soft"][1], [0.2, 0.1, 0.3], atol=1e-3)
    np.testing.assert_allclose(got["soft"][0], [0.2, 0.1, 1.0], atol=1e-3)
    assert np.isnan(got["ignore"][1]).all() and np.isnan(got["ignore"][0][:2]).all()
    with pytest.raises(ValueError, match="unkept"):
        pseudo_rows(pl, PseudoConfig(unkept="maybe"), None)


# ------------------------------------------------ the pseudo stream, pinned (values of the dense-array reading)
def _digest(a) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@pytest.fixture()
def pinned(tmp_path):
    """300 unlabeled inputs in 5 shards of top-5 over 8 labels, a 40-input labeled store (seeded)."""
    n, n_labels, k, chunk = 300, 8, 5, 64
    rng = np.random.default_rng(7)
    idx = np.stack([rng.permutation(n_labels)[:k] for _ in range(n)]).astype(np.int16)
    prob = np.sort(rng.random((n, k)), 1)[:, ::-1].astype(np.float16)
    for s in range(0, n, chunk):
        write_chunk(tmp_path / "pl", s, min(s + chunk, n), idx[s:s + chunk], prob[s:s + chunk])
    names = [f"l{j}" for j in range(n_labels)]
    (tmp_path / "pl" / "index.json").write_text(json.dumps({"num_inputs": n, "chunk_size": chunk, "top_k": k,
                                                            "label_names": names}))
    with StoreWriter(tmp_path / "unl", image_size=8) as w:
        for i in range(n):
            w.add(np.full((3, 8, 8), i % 256, np.uint8))
        w.commit_unit("all")
    with StoreWriter(tmp_path / "lab", image_size=8, label_names=names) as w:
        for i in range(40):
            w.add(np.full((3, 8, 8), i, np.uint8), labels=(rng.random(n_labels) < 0.3).astype(np.float32))
        w.commit_unit("all")
    return PseudoLabels(tmp_path / "pl"), SliceStore(tmp_path / "unl"), SliceStore(tmp_path / "lab")


# digests and rows recorded when PseudoLabels held whole (N, K) arrays and PseudoTargets a precomputed kept
# mask; reading shards one at a time and rows on demand must give the student the very same batches
PINNED = {
    "default": dict(cfg=PseudoConfig(), rows=("b7ec3a0857846117", 291), weights=None, targets="68be75bb3a354177",
                    streams=[("46062b4261d32be6", "bdc94665e1f7b63d"), ("aa3e62756dbd926d", "838c078fc4ccd8de"),
                             ("f80605df4e3b00a6", "294684edd3511bd9")],
                    batches=("99a522a76aeaaea6", "d4a9494fe903697c"), per_input=2.584192439862543,
                    few={0: [1.0, 0.0, 0.392333984375, 0.0, 0.36572265625, 0.0, 0.466796875, 0.4130859375],
                         65: [1.0, 1.0, 0.0, 0.1610107421875, 0.0, 0.0, 0.22265625, 1.0]}),
    "paper": dict(cfg=PseudoConfig(threshold=0.6, top_k=3, unkept="negative", balance=True), exclusive=True,
                  rows=("0c0a8f001c3e64f3", 279), weights="beea2a2d6cbba9e5", targets="11131e461cbf2f2a",
                  streams=[("46062b4261d32be6", "46ab8a2309c16ef0"), ("aa3e62756dbd926d", "4cb6802a60141fde"),
                           ("f80605df4e3b00a6", "17b4a36ba1a6ed18")],
                  batches=("88c5b456874c12db", "956af3d1e1c7af00"), per_input=1.946236559139785,
                  few={65: [1, 0, 0, 0, 0, 0, 0, 1], 299: [1, 0, 0, 0, 0, 0, 1, 0]}),  # 1 and 2 lost to 0
    "soft_ignore_all": dict(
        cfg=PseudoConfig(threshold=0.4, top_k=4, soft=True, unkept="ignore", drop_empty=False,
                         val_thresholds=True, balance=True), exclusive=True, val=True,
        rows=("98e038d3a30a9917", 300), weights="aaba52849a8acf58", targets="db341a655f1cd207",
        streams=[("46062b4261d32be6", "a7dec88e10bc76bc"), ("aa3e62756dbd926d", "ab2aa65a7a1747cf"),
                 ("f80605df4e3b00a6", "16708a613aded00e")],
        batches=("5dca4b8db378a67b", "1f0a1ff6b6bc83e7"), per_input=2.07,
        few={1: [np.nan, 0.0, np.nan, np.nan, 0.0, 0.0, np.nan, np.nan],
             299: [0.640625, np.nan, 0.5380859375, 0.0, 0.0, 0.0, 0.83984375, np.nan]}),
}


@pytest.mark.parametrize("case", sorted(PINNED))
def test_pseudo_rows_targets_and_stream_are_pinned(pinned, case):
    from dompre.train.pseudo_label import exclusive_matrix
    pl, unl, lab = pinned
    want = PINNED[case]
    exclusive = exclusive_matrix([(0, 1), (2, 5), (3, 4)], 8) if want.get("exclusive") else None
    val = np.linspace(0.3, 0.7, 8).astype(np.float32) if want.get("val") else None
    rows, targets, weights, summary = pseudo_rows(pl, want["cfg"], exclusive, val)
    assert (_digest(rows), len(rows)) == want["rows"] and rows.dtype == np.int64
    assert (weights is None) if want["weights"] is None else _digest(weights) == want["weights"]
    assert summary["labels_per_input"] == want["per_input"] and summary["used"] == len(rows)
    assert _digest(np.stack([targets[r] for r in range(len(pl))])) == want["targets"]
    for r, t in want["few"].items():
        np.testing.assert_array_equal(targets[r], np.asarray(t, np.float32))
    data = build_loaders(lab, np.arange(40), lab.labels, labeled_batch=4, seed=3, stage=2, num_workers=0,
                         unlabeled_store=unl, pseudo_rows_=rows, pseudo_targets=targets, pseudo_batch=5,
                         pseudo_weights=weights)
    for epoch, digests in zip((0, 1, 7), want["streams"]):  # (row, seed) of whole epochs, both loaders
        for sampler in data.samplers:
            sampler.set_epoch(epoch)
        assert tuple(_digest(np.array(list(s), np.int64)) for s in data.samplers) == digests
    for sampler in data.samplers:
        sampler.set_epoch(1)
    pse = [p for _, p in zip(*data.loaders)]
    assert (_digest(np.concatenate([b["index"].numpy() for b in pse])),
            _digest(np.concatenate([b["target"].numpy() for b in pse]))) == want["batches"]


def test_pseudo_labels_hold_no_per_input_array(pinned):
    """What a forked loader worker inherits from the parent: the rule's settings and the shards' names."""
    pl = pinned[0]
    rows, targets, weights, _ = pseudo_rows(pl, PseudoConfig(balance=True), None)
    arrays = [v for obj in (pl, targets) for v in vars(obj).values() if isinstance(v, np.ndarray)]
    assert sum(a.size for a in arrays) <= 8  # at most a per-label threshold
    idx, prob = pl.row(70)
    np.testing.assert_array_equal(idx, pl.idx[70])
    np.testing.assert_array_equal(prob, pl.prob[70])
    import pickle
    pl.row(0)
    assert pl._fds.fds and not pickle.loads(pickle.dumps(pl))._fds.fds  # descriptors are never pickled
    with pytest.raises(IndexError):
        pl.row(len(pl))


def test_forked_workers_read_the_same_pseudo_batches(pinned):
    """Workers (which open the shards themselves and give their inherited free heap back as they start) give
    the pinned batches."""
    pl, unl, lab = pinned
    want = PINNED["paper"]
    from dompre.train.pseudo_label import exclusive_matrix
    rows, targets, weights, _ = pseudo_rows(pl, want["cfg"], exclusive_matrix([(0, 1), (2, 5), (3, 4)], 8))
    targets[0]  # the parent has a shard open when it forks
    data = build_loaders(lab, np.arange(40), lab.labels, labeled_batch=4, seed=3, stage=2, num_workers=2,
                         unlabeled_store=unl, pseudo_rows_=rows, pseudo_targets=targets, pseudo_batch=5,
                         pseudo_weights=weights)
    for sampler in data.samplers:
        sampler.set_epoch(1)
    pse = [p for _, p in zip(*data.loaders)]
    assert (_digest(np.concatenate([b["index"].numpy() for b in pse])),
            _digest(np.concatenate([b["target"].numpy() for b in pse]))) == want["batches"]
    import gc
    gc.unfreeze()
