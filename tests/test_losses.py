"""dompre.train.losses, closed-form: LesaNet's label weights (values, cap, edge cases), the one weighted loss
(gamma 0 = weighted BCE, top-k hard pairs, NaN left out, soft targets), LesaNet's relational hard example mining
(reliable pairs from exclusive relations, draws ∝ |p - y|²) and the label-set triplet loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dompre.train.config import LossConfig
from dompre.train.losses import (MAX_LABEL_WEIGHT, RelationalHardExampleMining, WeightedFocalLoss,
                                 label_triplet_loss, label_weights, reliable_pairs)

NAN = float("nan")


def _bce(logits, y):
    """-(y log p + (1 - y) log(1 - p)) in float64, by hand."""
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_label_weights_values_cap_and_edge_cases():
    n = 50
    y = np.zeros((n, 6), np.float32)
    y[:1, 0] = 1                          # 1 of 4 known: 4/2 and 4/6
    y[4:, 0] = NAN
    y[0, 1], y[1:3, 1] = 1, NAN           # 1 positive, 47 negatives (2 NaN not counted): 48/2 -> capped, 48/94
    # column 2: no positive at all -> 1, 1
    y[:, 3] = NAN                         # only NaN -> 1, 1
    y[:, 4] = 1                           # no negative -> 1, 1
    y[:, 5] = 0.5                         # soft: 25 positives and 25 negatives -> 1, 1
    wp, wn = label_weights(y)
    assert wp.dtype == np.float32 and wp.shape == (6,)
    np.testing.assert_allclose(wp, [2.0, 20.0, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(wn, [4 / 6, 48 / 94, 1.0, 1.0, 1.0, 1.0], rtol=1e-6)
    wp_uncapped, _ = label_weights(y, max_weight=1000.0)
    assert wp_uncapped[1] == pytest.approx(24.0)  # the cap, not the formula, gave 20
    capped, _ = label_weights(y, max_weight=1.5)
    assert capped[0] == 1.5
    torch_wp, torch_wn = label_weights(torch.from_numpy(y))  # torch input: the same numbers
    np.testing.assert_array_equal(torch_wp, wp)
    np.testing.assert_array_equal(torch_wn, wn)
    assert MAX_LABEL_WEIGHT == LossConfig().max_label_weight == 20.0  # the recipe default is the one cap
    with pytest.raises(ValueError, match="matrix"):
        label_weights(np.zeros(3))


def test_gamma_0_is_the_hand_computed_weighted_bce_over_known_entries():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (5, 3)).astype(np.float32)
    y = np.array([[1, 0, NAN], [0, 0, 1], [NAN, 1, 0], [0, NAN, 0], [1, 1, 0]], np.float32)
    wp, wn = np.array([2.0, 1.5, 3.0], np.float32), np.array([0.6, 0.75, 0.5], np.float32)
    known = ~np.isnan(y)
    t = np.nan_to_num(y)
    expected = (_bce(logits, t) * np.where(t == 1, wp, wn))[known].sum() / known.sum()
    got = WeightedFocalLoss(wp, wn, gamma=0.0)(torch.from_numpy(logits), torch.from_numpy(y))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    unweighted = WeightedFocalLoss(gamma=0.0)(torch.from_numpy(logits), torch.from_numpy(y))  # no weights: 1
    assert float(unweighted) == pytest.approx(_bce(logits, t)[known].mean(), rel=1e-5)
    # soft targets: the element's weight interpolates between the negative and the positive weight
    soft = np.full((1, 3), 0.25, np.float32)
    w = 0.25 * wp + 0.75 * wn
    got = WeightedFocalLoss(wp, wn, gamma=0.0)(torch.from_numpy(logits[:1]), torch.from_numpy(soft))
    assert float(got) == pytest.approx((_bce(logits[:1], 0.25) * w).mean(), rel=1e-5)


def test_focal_gamma_scales_each_element_by_one_minus_pt_to_the_gamma():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    p = torch.sigmoid(logits).double().numpy()
    pt = np.where(y.numpy() == 1, p, 1 - p)
    expected = ((1 - pt) ** 2 * _bce(logits.numpy(), y.numpy())).mean()
    assert float(WeightedFocalLoss(gamma=2.0)(logits, y)) == pytest.approx(expected, rel=1e-5)


def test_hard_fraction_keeps_only_the_hardest_share_of_known_pairs():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 1.0, 4.0]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0, NAN], [0.0, 0.0, 0.0]])
    wp, wn = np.array([1.0, 2.0, 1.0], np.float32), np.array([1.0, 0.5, 3.0], np.float32)
    t = np.nan_to_num(y.numpy())
    elem = (_bce(logits.detach().numpy(), t) * np.where(t == 1, wp, wn))[~np.isnan(y.numpy())]  # 5 known pairs
    k = math.ceil(0.4 * 5)
    hardest = np.sort(elem)[::-1][:k]
    loss = WeightedFocalLoss(wp, wn, gamma=0.0, hard_fraction=0.4)(logits, y)
    assert loss.item() == pytest.approx(hardest.mean(), rel=1e-5)
    loss.backward()
    assert int((logits.grad != 0).sum()) == k  # only the kept pairs train
    plain = WeightedFocalLoss(wp, wn, gamma=0.0)
    assert WeightedFocalLoss(wp, wn, gamma=0.0, hard_fraction=1.0)(logits, y).item() == pytest.approx(
        plain(logits, y).item())  # mining everything is no mining
    assert loss.item() > plain(logits, y).item()
    with pytest.raises(ValueError, match="hard_fraction"):
        WeightedFocalLoss(hard_fraction=1.5)


# labels 0 chest, 1 abdomen, 2 lung, 3 liver, 4 nodule; chest-abdomen exclusive, so are lung-abdomen, chest-liver
# and lung-liver (the closure spreads exclusivity to children)
EXCLUSIVE = np.zeros((5, 5), bool)
for _i, _j in ((0, 1), (2, 1), (0, 3), (2, 3)):
    EXCLUSIVE[_i, _j] = EXCLUSIVE[_j, _i] = True


def test_reliable_pairs_are_the_positives_and_the_labels_exclusive_with_them():
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0],    # chest, lung: abdomen and liver are reliable negatives
                      [0.0, 1.0, 0.0, NAN, 0.0],    # abdomen: chest and lung reliable; liver uncertain stays out
                      [0.0, 0.0, 0.0, 0.0, NAN]])   # nothing positive: nothing reliable
    got = reliable_pairs(y, torch.from_numpy(EXCLUSIVE))
    assert got.tolist() == [[True, True, True, True, False],
                            [True, True, True, False, False],
                            [False] * 5]
    assert reliable_pairs(y, None).tolist() == (torch.nan_to_num(y) == 1).tolist()  # no ontology: positives only


def test_rhem_draws_reliable_pairs_in_proportion_to_the_squared_error_and_never_others():
    # lesion 0: chest positive; abdomen (reliable negative) confidently wrong, liver (reliable) nearly right,
    # nodule a plain 0 (unreliable: the report may just not mention it) even more wrong, lung uncertain
    logits = torch.tensor([[1.0, 3.0, -2.0, -4.0, 6.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, NAN, 0.0, 0.0]])
    p = torch.sigmoid(logits).detach().double().numpy()[0]
    t = np.nan_to_num(y.numpy()[0])
    reliable = np.array([True, True, False, True, False])
    w = np.where(reliable, np.abs(p - t) ** 2, 0.0)
    expected = float((w * _bce(logits.detach().numpy()[0], t)).sum() / w.sum())  # E[mean CE of the draws]
    torch.manual_seed(0)
    rhem = RelationalHardExampleMining(EXCLUSIVE, samples=200_000, power=2.0)
    loss = rhem(logits, y)
    assert loss.item() == pytest.approx(expected, rel=0.02)
    loss.backward()
    g = logits.grad[0].abs()
    assert g[2] == 0 and g[4] == 0  # the uncertain pair and the unreliable plain 0 are never drawn
    assert g[1] > 0.9 * g.sum()  # the confident mistake among the reliable pairs takes the gradient
    plain = float(_bce(logits.detach().numpy()[0], t)[reliable].mean())
    assert loss.item() > 1.5 * plain  # concentrated on the hard pair, well above the plain mean
    torch.manual_seed(0)
    uniform = RelationalHardExampleMining(EXCLUSIVE, samples=200_000, power=0.0)(logits.detach(), y)
    assert uniform.item() == pytest.approx(plain, rel=0.02)  # power 0: the reliable pairs uniformly
    assert RelationalHardExampleMining(None, samples=1000)(logits.detach(), y).item() == pytest.approx(
        float(_bce(1.0, 1.0)), rel=1e-5)  # no ontology: only the positive is reliable


def test_rhem_without_a_reliable_pair_is_zero_with_a_gradient():
    logits = torch.zeros(2, 5, requires_grad=True)
    loss = RelationalHardExampleMining(EXCLUSIVE, samples=10)(logits, torch.tensor([[0.0, 0.0, NAN, 0.0, 0.0]] * 2))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()
    exact = torch.tensor([[50.0, -50.0, -50.0, -50.0, 0.0]])  # every reliable pair already right (p - y = 0)
    assert RelationalHardExampleMining(EXCLUSIVE, samples=10)(exact, torch.tensor([[1.0, 0, 0, 0, 0]])).item() == 0
    with pytest.raises(ValueError, match="samples"):
        RelationalHardExampleMining(EXCLUSIVE, samples=0)


@pytest.mark.parametrize("hard_fraction", [0.0, 0.5])
def test_nan_entries_are_ignored(hard_fraction):
    y = torch.tensor([[1.0, NAN], [0.0, 1.0], [NAN, 0.0]])
    loss = WeightedFocalLoss(np.array([2.0, 1.5]), np.array([0.7, 0.8]), gamma=0.0, hard_fraction=hard_fraction)
    logits = torch.zeros(3, 2, requires_grad=True)
    base = loss(logits, y)
    base.backward()
    base = base.item()
    assert logits.grad[0, 1] == 0 and logits.grad[2, 0] == 0  # no gradient reaches an uncertain entry
    moved = torch.zeros(3, 2)
    moved[0, 1], moved[2, 0] = 50.0, -50.0
    assert loss(moved, y).item() == pytest.approx(base)
    if not hard_fraction:  # log 2 per known element, weights over the 4 known entries
        assert base == pytest.approx(math.log(2) * (2.0 + 0.7 + 1.5 + 0.8) / 4, rel=1e-6)
    none_known = loss(torch.zeros(2, 2), torch.full((2, 2), NAN))
    assert float(none_known) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        loss(torch.zeros(3, 3), y)


def test_triplet_loss_closed_form():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # already unit length
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # sim(0,1) = 1 > sim(0,2) = 0 and sim(1,0) = 1 > sim(1,2) = 0: triplets (0,1,2), (1,0,2); nothing else
    d01, d02, d12 = math.sqrt(2), 0.0, math.sqrt(2)
    expected = (max(0, d01 - d02 + 0.1) + max(0, d01 - d12 + 0.1)) / 2
    assert float(label_triplet_loss(emb, labels, 0.1)) == pytest.approx(expected, abs=1e-5)
    same = torch.ones(3, 2)
    assert float(label_triplet_loss(emb, same, 0.1)) == 0.0  # equal label sets: no triplet
