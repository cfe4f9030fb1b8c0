import pytest

from visrec.errors import VisrecError
from visrec.evaluate.retrieval import map_at_k, recall_at_k


def test_no_hits_is_zero():
    assert map_at_k({"q": list("abcdefg")}, {"q": ["z"]}) == 0.0
    assert map_at_k({"q": list("abcdefg")}, {"q": ["z"]}, form="min_gt") == 0.0


def test_hit_at_rank_7():
    ranked = {"q": list("abcdefz")}
    assert map_at_k(ranked, {"q": ["z"]}) == pytest.approx(1 / 7)
    assert map_at_k(ranked, {"q": ["z", "y"]}, form="min_gt") == pytest.approx((1 / 7) / 2)
    assert map_at_k(ranked, {"q": ["z", "y"]}, form="hits") == pytest.approx(1 / 7)


def test_several_gts_two_forms_differ():
    ranked = {"q": ["x", "a", "y", "b", "c", "d", "e"]}
    gt = {"q": ["x", "y", "w"]}
    # hits at ranks 1 and 3: precisions 1 and 2/3
    assert map_at_k(ranked, gt, form="hits") == pytest.approx((1 + 2 / 3) / 2)
    assert map_at_k(ranked, gt, form="min_gt") == pytest.approx((1 + 2 / 3) / 3)


def test_mean_over_queries_and_recall():
    ranked = {"q1": ["a"], "q2": ["b", "c"]}
    gt = {"q1": ["a"], "q2": ["c"], "q3": ["d"]}
    assert map_at_k(ranked, gt) == pytest.approx((1 + 0.5 + 0) / 3)
    assert recall_at_k(ranked, gt, k=1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, gt, k=2) == pytest.approx(2 / 3)


def test_duplicates_raise():
    with pytest.raises(VisrecError):
        map_at_k({"q": ["a", "a"]}, {"q": ["a"]})


def test_average_precision_refuses_a_repeated_id():
    from visrec.evaluate.retrieval import average_precision_at_k

    for form in ("hits", "min_gt"):
        with pytest.raises(VisrecError, match="duplicate catalogue id 'a'"):
            average_precision_at_k(["a", "a", "x"], ["a"], 7, form)
