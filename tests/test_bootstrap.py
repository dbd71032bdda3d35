"""Patient bootstrap of multi-label metrics: hand-made cases with known AUC and F1, and sklearn agreement."""
import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

from dompre.train.bootstrap import patient_weights, score_labels, weighted_auc, weighted_f1


def test_weighted_auc_hand_made_case():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    assert weighted_auc(s, y, np.ones((1, 4)))[0] == 0.75            # 3 of 4 pos/neg pairs ordered
    assert weighted_auc(np.array([0.5, 0.5]), np.array([0, 1]), np.ones((1, 2)))[0] == 0.5  # a tie: one half
    # weights are multiplicities: doubling the mis-ordered negative (0.4) equals duplicating it
    w = np.array([[1, 2, 1, 1]], np.float32)
    dup_s, dup_y = np.append(s, 0.4), np.append(y, 0)
    assert np.isclose(weighted_auc(s, y, w)[0], roc_auc_score(dup_y, dup_s))
    assert np.isnan(weighted_auc(s, np.zeros(4), np.ones((1, 4)))[0])  # no positive: undefined


def test_weighted_metrics_equal_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) * 0.5 + 0.4 * y, 2)                   # rounded: many ties
    assert np.isclose(weighted_auc(s, y.astype(int), np.ones((1, 300)))[0], roc_auc_score(y, s))
    pred = s >= 0.5
    assert np.isclose(weighted_f1(pred, y.astype(int), np.ones((1, 300)))[0], f1_score(y, pred))


def test_patient_weights_resample_whole_patients():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    w = patient_weights(groups, 200, seed=1)
    assert w.shape == (200, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert np.allclose(w[:, [0, 3, 4]].sum(1), 3)                      # 3 patients drawn per replicate
    assert w.std() > 0


def test_score_labels_point_estimate_and_interval():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 10)
    y = (rng.random((400, 3)) < 0.4).astype(int)
    y[:, 2] = 0                                                        # never positive: left out
    good = y + rng.normal(0, 0.3, y.shape)
    res = score_labels(good, y, np.full(3, 0.5), patient_weights(groups, 300))
    expected = np.mean([roc_auc_score(y[:, c], good[:, c]) for c in range(2)])
    assert res.n_labels == 2 and np.isclose(res.auc, expected)
    lo, hi = res.interval("auc")
    assert lo < res.auc < hi and hi - lo < 0.1
    chance = score_labels(rng.random((400, 3)), y, np.full(3, 0.5), patient_weights(groups, 300))
    assert chance.interval("auc")[1] < lo                              # a real difference is resolved
