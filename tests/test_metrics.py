"""LesaNet protocol and single-label metrics against values computed by hand."""
import math

import numpy as np
import pytest

from dompre.train.metrics import (THRESHOLD_GRID, choose_thresholds, classification_report, expand_to_parents,
                                  lesanet_eval)

N = np.nan


def test_threshold_grid_is_lesanets():
    assert THRESHOLD_GRID == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def test_choose_thresholds_best_f1_per_label():
    scores = np.array([[0.95, 0.20, 0.9, 0.90, 0.9],
                       [0.65, 0.10, 0.1, 0.50, 0.5],
                       [0.55, 0.10, 0.1, 0.35, 0.1],
                       [0.35, 0.25, 0.1, 0.10, 0.1],
                       [0.10, 0.05, 0.1, 0.10, 0.1]])
    labels = np.array([[1, 1, 0, 1, 1],
                       [1, 0, 0, 1, 1],
                       [0, 0, 0, N, 0],
                       [0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0]], dtype=float)
    th = choose_thresholds(scores, labels)
    # label 0: F1 at .3 = 4/6, .4/.5 = 4/5, .6 = 1, .7 = 2/3  -> 0.6
    # label 1: every score of the positive is below 0.3 -> no F1 > 0 -> 1.0
    # label 2: no positive -> 1.0
    # label 3: the uncertain 0.35 is skipped, so 0.3 already gives F1 = 1 (treated as 0 it would pick 0.4)
    # label 4: 0.3 ... 0.5 all give F1 = 1; ties keep the lowest
    np.testing.assert_allclose(th, [0.6, 1.0, 1.0, 0.3, 0.3])


def test_expand_to_parents_uses_original_predictions():
    pred = np.array([[False, False, True], [False, True, False], [False, False, False]])
    parents = [[], [0], [0, 1]]  # 2 -> 1 -> 0, all ancestors listed
    out = expand_to_parents(pred, parents)
    np.testing.assert_array_equal(out, [[True, True, True], [True, True, False], [False, False, False]])
    assert not pred[0, 0]  # input untouched
    with pytest.raises(ValueError, match="parent lists"):
        expand_to_parents(pred, [[]])


def _toy():
    # labels: 0 chest, 1 lung (child of chest), 2 liver, 3 all positive (undefined)
    scores = np.array([[0.2, 0.8, 0.1, 0.9],
                       [0.1, 0.2, 0.9, 0.9],
                       [0.6, 0.1, 0.7, 0.9],
                       [0.4, 0.6, 0.2, 0.9]])
    labels = np.array([[1, 1, 0, 1],
                       [0, 0, 1, 1],
                       [0, 0, N, 1],
                       [1, N, 0, 1]], dtype=float)
    return scores, labels


def test_lesanet_eval_with_parent_expansion_and_uncertain():
    scores, labels = _toy()
    res = lesanet_eval(scores, labels, 0.5, parents=[[], [0], [], []],
                       label_names=["chest", "lung", "liver", "all"])
    t = res["per_label"]
    # chest: predictions expand from lung -> [1,0,1,1] vs [1,0,0,1]: P 2/3, R 1, F1 0.8; AUC 2/4 pairs = 0.5
    assert t.loc["chest", "precision"] == pytest.approx(2 / 3)
    assert t.loc["chest", "recall"] == pytest.approx(1.0)
    assert t.loc["chest", "f1"] == pytest.approx(0.8)
    assert t.loc["chest", "auc"] == pytest.approx(0.5)
    # lung: the uncertain 4th sample (score 0.6) is skipped, so no false positive
    assert t.loc["lung", ["precision", "recall", "f1", "auc"]].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert (t.loc["lung", "n_pos"], t.loc["lung", "n_neg"]) == (1, 2)
    assert math.isnan(t.loc["all", "auc"]) and math.isnan(t.loc["all", "f1"])
    assert res["n_labels"] == 3
    assert res["auc"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert res["f1"] == pytest.approx((0.8 + 1 + 1) / 3)
    assert res["precision"] == pytest.approx((2 / 3 + 2) / 3)
    assert res["recall"] == pytest.approx(1.0)
    assert res["pred"][0].tolist() == [True, True, False, True]


def test_lesanet_eval_without_expansion_and_no_prediction_rule():
    scores, labels = _toy()
    t = lesanet_eval(scores, labels, np.array([0.5, 0.5, 0.95, 0.5]))["per_label"]
    # chest without expansion: only sample 2 predicted (a false positive)
    assert (t.loc[0, "precision"], t.loc[0, "recall"], t.loc[0, "f1"]) == (0.0, 0.0, 0.0)
    # liver: nothing predicted -> LesaNet counts precision as 1, recall 0, F1 0
    assert (t.loc[2, "precision"], t.loc[2, "recall"], t.loc[2, "f1"]) == (1.0, 0.0, 0.0)


def test_lesanet_eval_rejects_bad_input():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        lesanet_eval(np.zeros((2, 1)), np.array([[2.0], [0.0]]), 0.5)
    with pytest.raises(ValueError, match="n_samples"):
        lesanet_eval(np.zeros((2, 2)), np.zeros((2, 3)), 0.5)


def test_classification_report_multiclass():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    score = np.array([[0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1],
                      [0.1, 0.8, 0.1], [0.3, 0.1, 0.6], [0.6, 0.2, 0.2]])
    r = classification_report(y_true, y_pred, score)
    np.testing.assert_array_equal(r["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["mcc"] == pytest.approx(12 / math.sqrt(22 * 24))  # (c*s - sum p_k t_k) / sqrt(...)
    pc = r["per_class"]
    np.testing.assert_allclose(pc["precision"], [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(pc["recall"], [0.5, 1.0, 0.5])
    np.testing.assert_allclose(pc["f1"], [0.5, 0.8, 2 / 3])
    np.testing.assert_allclose(pc["specificity"], [3 / 4, 3 / 4, 1.0])
    np.testing.assert_allclose(pc["auc"], [7 / 8, 1.0, 1.0])
    assert r["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert r["specificity"] == pytest.approx((0.75 + 0.75 + 1) / 3)
    assert r["auc"] == pytest.approx((7 / 8 + 2) / 3)
    assert pc["support"].tolist() == [2, 2, 2]


def test_classification_report_string_labels_without_scores():
    r = classification_report(["polyp", "normal", "polyp", "normal"], ["polyp", "polyp", "polyp", "normal"],
                              labels=["normal", "polyp"])
    np.testing.assert_array_equal(r["confusion_matrix"], [[1, 1], [0, 2]])
    assert r["per_class"].loc["normal", "specificity"] == 1.0  # no polyp called normal
    assert r["per_class"].loc["polyp", "specificity"] == 0.5
    assert math.isnan(r["auc"])
    with pytest.raises(ValueError, match="y_score"):
        classification_report([0, 1], [0, 1], np.zeros((2, 3)), labels=[0, 1])


def test_lesanet_eval_empty_set_and_vectorised_matches_per_label_sklearn():
    res = lesanet_eval(np.zeros((0, 3)), np.zeros((0, 3)), 0.5)
    assert res["n_labels"] == 0 and math.isnan(res["auc"])
    np.testing.assert_array_equal(choose_thresholds(np.zeros((0, 2)), np.zeros((0, 2))), [1.0, 1.0])
    from sklearn.metrics import f1_score, roc_auc_score
    rng = np.random.default_rng(0)
    y = (rng.random((60, 5)) < 0.3).astype(float)
    y[rng.random((60, 5)) < 0.1] = np.nan
    y[:, 0] = np.where(np.isnan(y[:, 0]), 0, y[:, 0])  # one label without uncertain elements, batched AUC path
    y[:, 1] = y[:, 0]
    s = np.clip(np.nan_to_num(y) * 0.4 + rng.random((60, 5)) * 0.6, 0, 1)
    res = lesanet_eval(s, y, 0.5)
    for j in range(5):
        m = ~np.isnan(y[:, j])
        assert res["per_label"].loc[j, "auc"] == pytest.approx(roc_auc_score(y[m, j], s[m, j]))
        assert res["per_label"].loc[j, "f1"] == pytest.approx(f1_score(y[m, j], s[m, j] >= 0.5))
