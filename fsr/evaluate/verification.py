"""Face verification protocol: LFW pairs and 10-fold accuracy (Sec. V of the paper).

``read_pairs`` reads LFW's ``pairs.txt`` (View 2: 10 folds of 300 same-person and 300
different-person pairs) or a generic CSV ``a,b,same[,fold]``.

``kfold_verification`` scores pairs the LFW way: for each test fold the decision threshold
is the one that maximises accuracy on the other nine folds, and the test fold is then
classified with it. Threshold search is exact: the candidate thresholds are every midpoint
between consecutive distinct training scores plus one value below the lowest and one above
the highest score (any threshold in between gives the same training decisions), or, when
``grid`` is given, the grid values themselves (the reference's protocol uses the grid
0..2 step 0.0005 on dlib distances). Ties between equally accurate thresholds are broken
deterministically: the smallest threshold in the score's own units wins (for distances,
"same when d < t", this is the first grid point of the reference's protocol).

Decisions: with ``higher_is_same=True`` (cosine similarity) a pair is "same" when
``score > t``; with ``higher_is_same=False`` (Euclidean distance) when ``score < t``.
A NaN score means no comparison was possible (a face that could not be enrolled): such a
pair is always decided "different" (a same-person pair counts as an error, a
different-person pair as correct); NaNs never become candidate thresholds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "Pair",
    "PairsError",
    "VerificationResult",
    "read_pairs",
    "kfold_verification",
    "best_threshold",
    "roc_auc",
    "tar_at_far",
    "lfw_key",
    "PairedComparison",
    "mcnemar_exact_p",
    "paired_comparison",
]

_TRUE = {"1", "true", "yes", "y", "same", "t", "match"}
_FALSE = {"0", "false", "no", "n", "different", "diff", "f", "mismatch"}


class PairsError(ValueError):
    """A pairs file that cannot be read; ``str`` is ``"path: reason"``."""


@dataclass(frozen=True)
class Pair:
    """One verification pair: image keys ``a`` and ``b`` (LFW-relative, e.g.
    ``"Name/Name_0001.jpg"``, or whatever the CSV holds), ground truth ``same`` and the
    cross-validation ``fold`` (0-based)."""

    a: str
    b: str
    same: bool
    fold: int


def lfw_key(name: str, number: int | str) -> str:
    """LFW image key ``Name/Name_000N.jpg`` for a person and image number."""
    return f"{name}/{name}_{int(number):04d}.jpg"


def _read_lfw_pairs(path: Path, lines: list[list[str]]) -> list[Pair]:
    header = lines[0]
    try:
        n_folds, n_per_class = int(header[0]), int(header[1])
    except (IndexError, ValueError):
        raise PairsError(f"{path}: first line must be '<folds> <pairs per class>', got {' '.join(header)!r}") from None
    body = lines[1:]
    expected = n_folds * 2 * n_per_class
    if len(body) != expected:
        raise PairsError(f"{path}: expected {expected} pair lines ({n_folds} folds x 2 x {n_per_class}), found {len(body)}")
    pairs: list[Pair] = []
    for index, fields in enumerate(body):
        fold, within = divmod(index, 2 * n_per_class)
        lineno = index + 2
        try:
            if within < n_per_class:
                if len(fields) != 3:
                    raise ValueError("a same-person line needs 'name n1 n2'")
                name, n1, n2 = fields
                pairs.append(Pair(lfw_key(name, n1), lfw_key(name, n2), True, fold))
            else:
                if len(fields) != 4:
                    raise ValueError("a different-person line needs 'name1 n1 name2 n2'")
                name1, n1, name2, n2 = fields
                pairs.append(Pair(lfw_key(name1, n1), lfw_key(name2, n2), False, fold))
        except ValueError as exc:
            raise PairsError(f"{path}: line {lineno}: {exc} ({' '.join(fields)!r})") from None
    return pairs


def _parse_bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def _assign_folds(same: list[bool], n_folds: int) -> list[int]:
    """Deterministic folds for a CSV without a fold column: within each class, pairs in file
    order are cut into ``n_folds`` contiguous blocks of (nearly) equal size (as LFW does), so
    every fold holds the same share of same- and different-person pairs."""
    folds = [0] * len(same)
    for label in (True, False):
        idx = [i for i, s in enumerate(same) if s == label]
        for k, i in enumerate(idx):
            folds[i] = k * n_folds // len(idx)
    return folds


def _read_csv_pairs(path: Path, text: str, n_folds: int) -> list[Pair]:
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise PairsError(f"{path}: no pairs")
    header = [c.strip().lower() for c in rows[0]]
    has_header = len(header) >= 3 and (_parse_bool(header[2]) is None or header[:2] == ["a", "b"] or "fold" in header)
    fold_col = None
    if has_header:
        fold_col = header.index("fold") if "fold" in header else None
        rows = rows[1:]
    a_list, b_list, same_list, fold_list = [], [], [], []
    for lineno, row in enumerate(rows, start=2 if has_header else 1):
        if len(row) < 3:
            raise PairsError(f"{path}: line {lineno}: expected 'a,b,same', got {','.join(row)!r}")
        same = _parse_bool(row[2])
        if same is None:
            raise PairsError(f"{path}: line {lineno}: cannot read 'same' value {row[2]!r} (use 1/0, true/false, yes/no)")
        a_list.append(row[0].strip())
        b_list.append(row[1].strip())
        same_list.append(same)
        if fold_col is not None:
            try:
                fold_list.append(int(row[fold_col]))
            except (IndexError, ValueError):
                raise PairsError(f"{path}: line {lineno}: fold must be an integer") from None
    if not a_list:
        raise PairsError(f"{path}: no pairs")
    if fold_col is None:
        if len(set(same_list)) < 2:
            raise PairsError(f"{path}: needs both same and different pairs")
        n = min(n_folds, same_list.count(True), same_list.count(False))
        fold_list = _assign_folds(same_list, n)
    else:
        base = min(fold_list)
        fold_list = [f - base for f in fold_list]
    return [Pair(a, b, s, f) for a, b, s, f in zip(a_list, b_list, same_list, fold_list)]


def read_pairs(path: str | Path, n_folds: int = 10) -> list[Pair]:
    """Read verification pairs from LFW ``pairs.txt`` or a CSV.

    LFW format: first line ``<folds> <n>``, then per fold ``n`` lines ``name n1 n2`` (same
    person) and ``n`` lines ``name1 n1 name2 n2`` (different); keys are ``Name/Name_000N.jpg``.
    CSV: columns ``a,b,same`` (optional header; ``same`` as 1/0, true/false, yes/no) and an
    optional ``fold`` column; without it, folds are assigned deterministically (each class
    cut into ``n_folds`` contiguous blocks in file order).
    Raises :class:`PairsError` ("path: reason") on a malformed file.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsError(f"{path}: cannot read ({exc})") from None
    if path.suffix.lower() == ".csv" or "," in text.split("\n", 1)[0]:
        return _read_csv_pairs(path, text, n_folds)
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise PairsError(f"{path}: empty pairs file")
    return _read_lfw_pairs(path, lines)


@dataclass
class VerificationResult:
    """Outcome of :func:`kfold_verification`.

    ``accuracy_mean``/``accuracy_std``: mean and (population, ddof=0) standard deviation of
    the test-fold accuracies; ``fold_accuracies`` and ``thresholds`` per fold (thresholds in
    the score's own units); ``auc``: ROC area over all pairs; ``tar_at_far_1e3``: true accept
    rate at a false accept rate of 1e-3 over all pairs; ``n_pairs``; ``n_failed``: pairs
    with a NaN score (decided "different"). ``correct``: (P,) bool, whether each pair was
    decided right by its fold's threshold (for paired comparisons; not serialised).
    """

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    thresholds: list[float]
    auc: float
    tar_at_far_1e3: float
    n_pairs: int = 0
    n_failed: int = 0
    higher_is_same: bool = True
    extra: dict = field(default_factory=dict)
    correct: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("correct", None)
        return out


def _oriented(scores: np.ndarray, higher_is_same: bool) -> np.ndarray:
    """Scores in "higher = same" orientation; NaN -> -inf (always decided different)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s if higher_is_same else -s
    return np.where(np.isnan(s), -np.inf, s)


def _accuracies(sorted_s: np.ndarray, sorted_same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of the rule "same when s > t" for each t (all in oriented units)."""
    n = sorted_s.size
    same_cum = np.concatenate([[0], np.cumsum(sorted_same)])  # same pairs among the k lowest
    k = np.searchsorted(sorted_s, thresholds, side="right")  # pairs with s <= t: decided different
    diff_below = k - same_cum[k]
    same_above = same_cum[-1] - same_cum[k]
    return (diff_below + same_above) / n


def _candidate_thresholds(sorted_s: np.ndarray) -> np.ndarray:
    finite = np.unique(sorted_s[np.isfinite(sorted_s)])
    if finite.size == 0:
        return np.array([0.0])
    mids = (finite[:-1] + finite[1:]) / 2
    span = max(1.0, float(np.abs(finite).max()))
    return np.concatenate([[finite[0] - 1e-6 * span], mids, [finite[-1] + 1e-6 * span]])


def best_threshold(
    scores: np.ndarray, same: np.ndarray, higher_is_same: bool = True, grid: np.ndarray | None = None
) -> tuple[float, float]:
    """Threshold (score units) maximising accuracy on these pairs, and that accuracy.

    Ties: the smallest threshold in score units. See the module docstring for the rules.
    """
    s = _oriented(scores, higher_is_same)
    order = np.argsort(s, kind="stable")
    s_sorted, same_sorted = s[order], np.asarray(same, dtype=np.int64)[order]
    if grid is None:
        cand = _candidate_thresholds(s_sorted)  # oriented units, ascending
    else:
        g = np.asarray(grid, dtype=np.float64)
        cand = g if higher_is_same else -g
    acc = _accuracies(s_sorted, same_sorted, cand)
    best = acc.max()
    hits = np.flatnonzero(acc == best)
    # smallest threshold in the score's own units
    original = cand if higher_is_same else -cand
    pick = hits[np.argmin(original[hits])]
    return float(original[pick]), float(best)


def roc_auc(scores: np.ndarray, same: np.ndarray, higher_is_same: bool = True) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count one half)."""
    s = _oriented(scores, higher_is_same)
    y = np.asarray(same, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks (1-based) over ties
    boundaries = np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float = 1e-3, higher_is_same: bool = True) -> float:
    """True accept rate at the strictest threshold whose false accept rate is <= ``far``.

    With ``n_neg`` different-person pairs, at most ``floor(far * n_neg)`` of them may be
    accepted: the threshold is the (k+1)-th highest different-pair score and a pair is
    accepted when its score is strictly above it (with 3,000 LFW negatives: at most 3).
    """
    s = _oriented(scores, higher_is_same)
    y = np.asarray(same, dtype=bool)
    neg = np.sort(s[~y])[::-1]
    if neg.size == 0 or y.sum() == 0:
        return float("nan")
    k = int(np.floor(far * neg.size + 1e-9))
    t = neg[min(k, neg.size - 1)]
    if k >= neg.size:
        t = -np.inf
    return float(np.mean(s[y] > t))


def kfold_verification(
    scores: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray,
    higher_is_same: bool = True,
    grid: np.ndarray | None = None,
) -> VerificationResult:
    """k-fold verification accuracy: each test fold's threshold is chosen on the other folds.

    scores: (P,) similarity (``higher_is_same=True``) or distance (False); NaN = no comparison
    possible (decided "different"). same: (P,) bool ground truth. folds: (P,) int fold ids.
    grid: optional threshold grid (score units) instead of the exact midpoint search.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    if not (scores.shape == same.shape == folds.shape) or scores.ndim != 1:
        raise ValueError(f"scores, same and folds must be 1-D of equal length, got {scores.shape}, {same.shape}, {folds.shape}")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError("k-fold verification needs at least two folds")
    s_all = _oriented(scores, higher_is_same)
    accs, thresholds = [], []
    correct = np.zeros(scores.size, dtype=bool)
    for f in fold_ids:
        test = folds == f
        t, _ = best_threshold(scores[~test], same[~test], higher_is_same, grid)
        t_oriented = t if higher_is_same else -t
        decided_same = s_all[test] > t_oriented
        correct[test] = decided_same == same[test]
        accs.append(float(np.mean(correct[test])))
        thresholds.append(t)
    acc = np.array(accs)
    return VerificationResult(
        accuracy_mean=float(acc.mean()),
        accuracy_std=float(acc.std()),
        fold_accuracies=accs,
        thresholds=thresholds,
        auc=roc_auc(scores, same, higher_is_same),
        tar_at_far_1e3=tar_at_far(scores, same, 1e-3, higher_is_same),
        n_pairs=int(scores.size),
        n_failed=int(np.isnan(scores).sum()),
        higher_is_same=higher_is_same,
        correct=correct,
    )


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value for paired decisions: ``wins`` pairs only system A
    decided right, ``losses`` pairs only system B did; under the null hypothesis (equal
    accuracy) each discordant pair is a fair coin, so p = min(1, 2 P[Bin(n, 1/2) <= min])."""
    if wins < 0 or losses < 0:
        raise ValueError("wins and losses must be non-negative")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


@dataclass
class PairedComparison:
    """System A against a baseline B on the same pairs and folds.

    ``delta``: accuracy(A) - accuracy(B) (mean over folds); ``fold_deltas``: per-fold
    differences and ``delta_se``: their standard error (sample std / sqrt(k)); ``wins`` /
    ``losses``: pairs only A / only B decided right; ``p_value``: exact McNemar (two-sided)."""

    delta: float
    delta_se: float
    fold_deltas: list[float]
    wins: int
    losses: int
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a: VerificationResult, b: VerificationResult) -> PairedComparison:
    """Compare two :func:`kfold_verification` results computed on the same pairs and folds."""
    if a.correct is None or b.correct is None or a.correct.shape != b.correct.shape:
        raise ValueError("paired comparison needs per-pair decisions of both systems on the same pairs")
    if len(a.fold_accuracies) != len(b.fold_accuracies):
        raise ValueError("paired comparison needs the same folds for both systems")
    d = np.asarray(a.fold_accuracies) - np.asarray(b.fold_accuracies)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    wins = int(np.sum(a.correct & ~b.correct))
    losses = int(np.sum(~a.correct & b.correct))
    return PairedComparison(float(d.mean()), se, [float(x) for x in d], wins, losses, mcnemar_exact_p(wins, losses))
