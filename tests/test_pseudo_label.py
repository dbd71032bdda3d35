"""The pseudo-label rule (top-k, threshold, exclusivity), targets, storage and the labeling pass, closed-form."""
import json

import numpy as np
import torch

from dompre.train.pseudo_label import (PseudoLabels, balance_weights, chunk_done, chunk_ranges, dense_targets,
                                       exclusive_matrix, rank_chunks, select_labels, topk, write_chunk)


def _rule(probs, threshold=0.5, k=15, pairs=()):
    idx, prob = topk(torch.tensor(probs, dtype=torch.float32), max(k, 1))
    kept = select_labels(idx, prob, threshold, k, exclusive_matrix(pairs, len(probs[0])))
    return {int(i) for i, m in zip(idx[0], kept[0]) if m}


def test_threshold_is_strict():
    assert _rule([[0.9, 0.5, 0.51, 0.2]]) == {0, 2}


def test_top_k_limits_kept_labels():
    probs = [np.linspace(0.99, 0.6, 20).tolist()]  # 20 labels above threshold, descending
    assert _rule(probs, k=15) == set(range(15))
    assert _rule(probs, k=3) == {0, 1, 2}


def test_exclusive_pair_keeps_more_confident():
    # labels 1 and 3 exclusive: 3 is more confident, so 1 goes; 0 stays
    assert _rule([[0.8, 0.7, 0.1, 0.95]], pairs=[(1, 3)]) == {0, 3}
    # chain 0-1, 1-2 exclusive with 0 > 1 > 2: 1 dropped by 0, so 2 no longer clashes and stays
    assert _rule([[0.9, 0.8, 0.7]], pairs=[(0, 1), (1, 2)]) == {0, 2}


def test_exclusive_label_below_threshold_does_not_remove_other():
    assert _rule([[0.4, 0.8]], pairs=[(0, 1)]) == {1}


def test_dense_targets_hard_and_soft():
    idx = np.array([[2, 0, 1]], np.int16)
    prob = np.array([[0.9, 0.6, 0.3]], np.float16)
    kept = select_labels(idx, prob, 0.5, 15)
    np.testing.assert_array_equal(dense_targets(idx, prob, kept, 4), [[1, 0, 1, 0]])
    np.testing.assert_allclose(dense_targets(idx, prob, kept, 4, soft=True), [[0.6, 0, 0.9, 0]], atol=1e-3)


def test_balance_weights_favour_rare_labels():
    idx = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [0, 1], [0, 1]], np.int16)
    kept = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [1, 1]], bool)
    w = balance_weights(idx, kept, 3)
    # counts: label0 = 4, label1 = 2, label2 = 0; median of the seen ones 3 -> 3/4 and 3/2; empty input 1;
    # the last input keeps both: mean(3/4, 3/2)
    np.testing.assert_allclose(w, [0.75, 0.75, 0.75, 1.5, 1.0, 1.125])
    rng = np.random.default_rng(0)  # same weights as the per-input definition on a random case
    idx = np.stack([rng.permutation(20)[:5] for _ in range(300)]).astype(np.int16)
    kept = rng.random((300, 5)) < 0.3
    counts = np.bincount(idx[kept].astype(np.int64), minlength=20)
    ref = np.median(counts[counts > 0])
    loop = [np.mean(ref / counts[i[k]]) if k.any() else 1.0 for i, k in zip(idx.astype(np.int64), kept)]
    np.testing.assert_allclose(balance_weights(idx, kept, 20), np.clip(loop, 0.1, 10))


def test_chunks_are_global_and_split_contiguously():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    parts = [rank_chunks(10, 4, r, 2) for r in range(2)]
    assert parts == [[(0, 4), (4, 8)], [(8, 10)]]
    assert sum(parts, []) == chunk_ranges(10, 4)


def test_storage_roundtrip(tmp_path):
    idx = np.array([[1, 0], [0, 1], [1, 0]], np.int16)
    prob = np.array([[0.9, 0.2], [0.7, 0.6], [0.3, 0.1]], np.float16)
    write_chunk(tmp_path, 0, 2, idx[:2], prob[:2])
    assert chunk_done(tmp_path, 0, 2) and not chunk_done(tmp_path, 2, 3)
    write_chunk(tmp_path, 2, 3, idx[2:], prob[2:])
    (tmp_path / "index.json").write_text(json.dumps({"num_inputs": 3, "chunk_size": 2, "top_k": 2,
                                                     "label_names": ["a", "b"]}))
    pl = PseudoLabels(tmp_path)
    np.testing.assert_array_equal(pl.idx, idx)
    kept = pl.kept(0.5, 15, None)
    np.testing.assert_array_equal(kept, [[True, False], [True, True], [False, False]])


def test_per_label_thresholds():
    idx = np.array([[0, 1, 2]], np.int16)
    prob = np.array([[0.8, 0.7, 0.6]], np.float16)
    kept = select_labels(idx, prob, np.array([0.9, 0.5, 0.5]), 15)  # label 0 needs > 0.9 now
    np.testing.assert_array_equal(kept, [[False, True, True]])


def test_rule_on_one_input_equals_rule_on_all_and_the_plain_walk():
    """select_labels walks one input (a worker's target) and many (the parent's pass) by two code paths; both
    equal the rule walked label by label, with exclusivity in either direction."""
    rng = np.random.default_rng(3)
    n, n_labels, k = 400, 12, 6
    idx = np.stack([rng.permutation(n_labels)[:k] for _ in range(n)]).astype(np.int16)
    prob = np.sort(rng.random((n, k)), 1)[:, ::-1].astype(np.float16)
    exclusive = rng.random((n_labels, n_labels)) < 0.25  # not symmetric: [earlier, later] is what counts
    thr = rng.uniform(0.2, 0.6, n_labels)
    for threshold, top_k, ex in ((0.3, 4, exclusive), (thr, 6, exclusive), (0.5, 3, None)):
        many = select_labels(idx, prob, threshold, top_k, ex)
        one = np.concatenate([select_labels(idx[i:i + 1], prob[i:i + 1], threshold, top_k, ex) for i in range(n)])
        want = np.zeros((n, k), bool)
        for i in range(n):
            for p in range(min(top_k, k)):
                t = threshold[idx[i, p]] if np.ndim(threshold) else threshold
                clash = ex is not None and any(want[i, q] and ex[idx[i, q], idx[i, p]] for q in range(p))
                want[i, p] = float(prob[i, p]) > np.float32(t) and not clash
        np.testing.assert_array_equal(many, want)
        np.testing.assert_array_equal(one, want)


def test_balance_weights_of_parts_equal_the_whole():
    rng = np.random.default_rng(4)
    idx = np.stack([rng.permutation(9)[:4] for _ in range(200)])
    kept = rng.random((200, 4)) < 0.4
    counts = np.bincount(idx[kept], minlength=9)
    parts = np.concatenate([balance_weights(idx[s:s + 64], kept[s:s + 64], 9, counts) for s in range(0, 200, 64)])
    np.testing.assert_array_equal(parts, balance_weights(idx, kept, 9))


def test_damaged_or_missing_shards_are_named(tmp_path):
    import pytest

    from dompre.errors import UserError
    write_chunk(tmp_path, 0, 2, np.zeros((2, 3), np.int16), np.zeros((2, 3), np.float16))
    (tmp_path / "index.json").write_text(json.dumps({"num_inputs": 2, "chunk_size": 2, "top_k": 3,
                                                     "label_names": ["a", "b", "c"]}))
    np.testing.assert_array_equal(PseudoLabels(tmp_path).row(1)[0], [0, 0, 0])
    prob = tmp_path / "topk-000000000-000000002.prob.npy"
    np.save(prob, np.zeros((2, 3), np.float32))  # another dtype
    with pytest.raises(UserError, match="prob.npy.*float16"):
        PseudoLabels(tmp_path)
    np.save(prob, np.zeros((3, 3), np.float16))  # another shape
    with pytest.raises(UserError, match=r"\(3, 3\) where \(2, 3\)"):
        PseudoLabels(tmp_path)
    np.save(prob, np.zeros((2, 3), np.float16))
    prob.write_bytes(prob.read_bytes()[:-4])  # truncated
    with pytest.raises(UserError, match="in 136 bytes"):
        PseudoLabels(tmp_path)
    prob.unlink()
    with pytest.raises(FileNotFoundError, match="prob.npy is missing"):
        PseudoLabels(tmp_path)
