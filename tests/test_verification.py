"""The LFW verification protocol: pairs parsing and k-fold accuracy with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fsr.evaluate.verification import (
    PairsError,
    best_threshold,
    kfold_verification,
    mcnemar_exact_p,
    paired_comparison,
    read_pairs,
    roc_auc,
    tar_at_far,
)
from tests.conftest import LFW_DIR, REFERENCE_DIR, SHARED_DATA, WILD_DIR

PAIRS_TXT = SHARED_DATA / "lfw" / "pairs.txt"


def _outlier_fold_scores():
    """10 folds of 10 same (0.8) + 10 different (0.2) scores, except fold 0 whose same pairs
    score 0.3. Known answer: fold 0 is tested with the threshold of folds 1-9 (midpoint 0.5)
    and gets 50%; folds 1-9 are tested with 0.25 (fold 0's 0.3 is in their training set) and
    get 100%: mean 0.95, population std 0.15."""
    scores, same, folds = [], [], []
    for f in range(10):
        scores += [0.3 if f == 0 else 0.8] * 10 + [0.2] * 10
        same += [True] * 10 + [False] * 10
        folds += [f] * 20
    return np.array(scores), np.array(same), np.array(folds)


def test_kfold_threshold_is_chosen_on_the_other_folds():
    scores, same, folds = _outlier_fold_scores()
    r = kfold_verification(scores, same, folds)
    assert r.fold_accuracies[0] == pytest.approx(0.5)
    assert r.fold_accuracies[1:] == pytest.approx([1.0] * 9)
    assert r.accuracy_mean == pytest.approx(0.95)
    assert r.accuracy_std == pytest.approx(0.15)
    assert r.thresholds[0] == pytest.approx(0.5)
    assert r.thresholds[1:] == pytest.approx([0.25] * 9)
    assert r.n_pairs == 200 and r.n_failed == 0


def test_per_pair_decisions_match_the_fold_accuracies():
    scores, same, folds = _outlier_fold_scores()
    r = kfold_verification(scores, same, folds)
    assert r.correct.shape == (200,) and r.correct.dtype == bool
    # fold 0 is tested with 0.5: its same pairs (0.3) are wrong, its different pairs right
    assert not r.correct[:10].any() and r.correct[10:20].all() and r.correct[20:].all()
    assert [r.correct[folds == f].mean() for f in range(10)] == pytest.approx(r.fold_accuracies)
    assert "correct" not in r.to_dict()


def test_mcnemar_exact_known_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)  # 2 * 0.5**10
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    assert mcnemar_exact_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    # large counts stay exact (no overflow): 3,000 discordant pairs split 1,560 / 1,440
    p = mcnemar_exact_p(1560, 1440)
    assert 0.02 < p < 0.04  # normal approximation: z = 120 / sqrt(3000) = 2.19, p ~ 0.028
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


def test_paired_comparison_counts_discordant_pairs():
    scores, same, folds = _outlier_fold_scores()
    worse = kfold_verification(scores, same, folds)  # fold 0 at 50%
    fixed = scores.copy()
    fixed[:10] = 0.8  # fold 0's same pairs now score like the others: every fold at 100%
    better = kfold_verification(fixed, same, folds)
    assert better.accuracy_mean == pytest.approx(1.0)
    c = paired_comparison(better, worse)
    assert c.wins == 10 and c.losses == 0
    assert c.delta == pytest.approx(0.05)
    assert c.fold_deltas == pytest.approx([0.5] + [0.0] * 9)
    assert c.delta_se == pytest.approx(np.std([0.5] + [0.0] * 9, ddof=1) / np.sqrt(10))
    assert c.p_value == pytest.approx(2 / 1024)
    back = paired_comparison(worse, better)
    assert back.wins == 0 and back.losses == 10 and back.delta == pytest.approx(-0.05) and back.p_value == c.p_value
    same_again = paired_comparison(worse, worse)
    assert same_again.wins == same_again.losses == 0 and same_again.p_value == 1.0


def test_distances_give_the_same_decisions_as_negated_similarities():
    scores, same, folds = _outlier_fold_scores()
    sim = kfold_verification(scores, same, folds, higher_is_same=True)
    dist = kfold_verification(-scores, same, folds, higher_is_same=False)
    assert dist.fold_accuracies == pytest.approx(sim.fold_accuracies)
    assert dist.thresholds == pytest.approx([-t for t in sim.thresholds])
    assert dist.auc == pytest.approx(sim.auc)


def test_ties_pick_the_smallest_threshold():
    # similarity; thresholds 0.15, 0.25 and 0.35 all reach 3/4: the smallest wins
    t, acc = best_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([False, True, False, True]))
    assert acc == pytest.approx(0.75)
    assert t == pytest.approx(0.15)
    # grid search: first grid point of the best plateau (the reference's rule)
    t, acc = best_threshold(
        np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, True, False, False]), higher_is_same=False, grid=np.arange(0, 1.0001, 0.05)
    )
    assert acc == 1.0 and t == pytest.approx(0.25)


def test_failure_to_enrol_is_decided_different():
    scores, same, folds = _outlier_fold_scores()
    scores = scores.copy()
    scores[folds == 3] = np.where(same[folds == 3], np.nan, scores[folds == 3])  # fold 3's same pairs fail
    r = kfold_verification(scores, same, folds)
    assert r.n_failed == 10
    assert r.fold_accuracies[3] == pytest.approx(0.5)
    assert all(np.isfinite(r.thresholds))


def test_auc_and_tar_known_values():
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False])) == pytest.approx(0.875)
    rng = np.random.default_rng(0)
    s = rng.normal(size=300).round(1)  # many ties
    y = rng.random(300) < 0.4
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in s[y] for n in s[~y]])
    assert roc_auc(s, y) == pytest.approx(brute)
    # 1000 negatives 0.000..0.999: at FAR 1e-3 one may pass, so t = 0.998 (strictly above it)
    neg = np.arange(1000) / 1000
    pos = np.array([0.9985, 0.9995, 1.5, 0.5])
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(4, bool), np.zeros(1000, bool)])
    assert tar_at_far(scores, labels, 1e-3) == pytest.approx(0.75)
    assert tar_at_far(-scores, labels, 1e-3, higher_is_same=False) == pytest.approx(0.75)


def test_lfw_pairs_txt_is_read():
    pairs = read_pairs(PAIRS_TXT)
    assert len(pairs) == 6000
    folds = np.array([p.fold for p in pairs])
    same = np.array([p.same for p in pairs])
    assert sorted(set(folds.tolist())) == list(range(10))
    for f in range(10):
        assert same[folds == f].sum() == 300 and (~same[folds == f]).sum() == 300
    assert pairs[0].a == "Abel_Pacheco/Abel_Pacheco_0001.jpg" and pairs[0].b == "Abel_Pacheco/Abel_Pacheco_0004.jpg"
    keys = {k for p in pairs for k in (p.a, p.b)}
    assert len(keys) == 7701
    assert all((LFW_DIR / k).is_file() for k in keys)


def test_reference_anchor_is_reproduced_from_its_descriptors():
    """dlib's own descriptors + the reference's grid protocol give the anchor's exact fold accuracies."""
    pairs = read_pairs(PAIRS_TXT)
    data = np.load(REFERENCE_DIR / "lfw_dlib_descriptors.npz")
    anchor = json.loads((REFERENCE_DIR / "lfw_dlib_anchor.json").read_text())["results"]
    index = {str(k).removeprefix("lfw/"): i for i, k in enumerate(data["paths"])}
    a = np.array([index[p.a] for p in pairs])
    b = np.array([index[p.b] for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    grid = np.round(np.arange(4001) * 0.0005, 4)
    for condition in ("HR", "LR32"):
        emb = data[condition]
        dist = np.linalg.norm(emb[a] - emb[b], axis=1)
        r = kfold_verification(dist, same, folds, higher_is_same=False, grid=grid)
        assert r.fold_accuracies == pytest.approx(anchor[condition]["fold_acc"], abs=1e-12)
        assert r.thresholds == pytest.approx(anchor[condition]["fold_threshold"], abs=1e-9)
        assert r.accuracy_std == pytest.approx(anchor[condition]["std_acc"], abs=1e-9)
        exact = kfold_verification(dist, same, folds, higher_is_same=False)
        assert abs(exact.accuracy_mean - r.accuracy_mean) < 0.002
        assert 0.99 < exact.auc <= 1.0 and 0.85 < exact.tar_at_far_1e3 <= 1.0


def test_csv_pairs_with_and_without_folds(tmp_path):
    wild = read_pairs(WILD_DIR / "master.csv")
    assert len(wild) == 300
    counts = np.bincount([p.fold for p in wild])
    assert counts.size == 10 and counts.min() >= 29
    for f in range(10):  # both classes in every fold
        labels = {p.same for p in wild if p.fold == f}
        assert labels == {True, False}
    assert read_pairs(WILD_DIR / "master.csv") == wild  # deterministic
    csv = tmp_path / "pairs.csv"
    csv.write_text("a,b,same,fold\nx.jpg,y.jpg,1,1\nx.jpg,z.jpg,0,1\nu.jpg,v.jpg,true,2\nu.jpg,w.jpg,no,2\n")
    pairs = read_pairs(csv)
    assert [p.fold for p in pairs] == [0, 0, 1, 1] and [p.same for p in pairs] == [True, False, True, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,same\nx.jpg,y.jpg,maybe\n")
    with pytest.raises(PairsError, match="bad.csv: line 2"):
        read_pairs(bad)
    truncated = tmp_path / "pairs.txt"
    truncated.write_text("\n".join(PAIRS_TXT.read_text().splitlines()[:100]))
    with pytest.raises(PairsError, match="expected 6000 pair lines"):
        read_pairs(truncated)
