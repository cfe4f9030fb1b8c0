"""Landmark metrics against hand-computed cases."""

import numpy as np
import pytest

from visrec.errors import VisrecError
from visrec.evaluate.landmarks import auc, ced_curve, failure_rate, nme, normaliser


def square_face(n=106, size=100.0):
    """Points spread over a size x size box (so sqrt(w*h) = size, diagonal = size*sqrt(2))."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, size, (1, n, 2))
    pts[0, 0], pts[0, 1] = (0, 0), (size, size)
    return pts


def test_nme_sqrt_area_by_hand():
    gt = square_face()
    pred = gt + np.array([3.0, 4.0])  # every point off by 5 px
    assert nme(pred, gt)[0] == pytest.approx(5 / 100)
    assert nme(pred, gt, "bbox_diagonal")[0] == pytest.approx(5 / (100 * np.sqrt(2)))


def test_inter_ocular_and_pupil_use_the_scheme_indices():
    gt = square_face()
    gt[0, 52], gt[0, 61] = (20, 40), (80, 40)   # outer corners 60 px apart
    gt[0, 104], gt[0, 105] = (30, 40), (70, 40)  # pupils 40 px apart
    pred = gt + np.array([0.0, 6.0])
    assert nme(pred, gt, "inter_ocular")[0] == pytest.approx(6 / 60)
    assert nme(pred, gt, "inter_pupil")[0] == pytest.approx(6 / 40)
    with pytest.raises(VisrecError, match="no eye indices"):
        normaliser(np.ones((1, 5, 2)), "inter_ocular")


def test_auc_and_failure_rate_edges():
    assert auc([0.0, 0.0, 0.0]) == 1.0
    assert auc([0.09, 0.5, 0.081]) == 0.0
    assert auc([0.04]) == pytest.approx(0.5)          # CED is 0 on [0, 0.04), 1 after: half the area
    assert auc([0.0, 0.08]) == pytest.approx(0.5)
    assert failure_rate([0.01, 0.08, 0.09, 0.2]) == 0.5  # > alpha fails; exactly alpha does not
    x, y = ced_curve([0.02, 0.06], alpha=0.08, steps=8)
    assert y[0] == 0 and y[2] == 0.5 and y[-1] == 1.0
    # the exact AUC equals the numerical area under the CED
    nm = np.random.default_rng(1).uniform(0, 0.1, 500)
    x, y = ced_curve(nm, steps=200000)
    assert auc(nm) == pytest.approx(np.trapezoid(y, x) / 0.08, abs=1e-4)


def test_bad_input():
    with pytest.raises(VisrecError, match="faces, points, 2"):
        nme(np.zeros((2, 106, 2)), np.zeros((2, 98, 2)))
    bad = square_face()
    bad[0, 3, 0] = np.nan
    with pytest.raises(VisrecError, match="NaN"):
        nme(bad, square_face())


def test_report_metrics_use_the_normalisations_the_scheme_defines_and_refuse_bad_points():
    from visrec.evaluate.landmark_report import landmark_metrics

    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (4, 106, 2))
    assert list(landmark_metrics(gt + 1, gt)) == ["sqrt_area", "inter_ocular", "inter_pupil", "bbox_diagonal"]
    five = rng.uniform(0, 100, (4, 5, 2))  # no eye indices known for 5 points: only the box-based ones
    assert list(landmark_metrics(five + 1, five)) == ["sqrt_area", "bbox_diagonal"]
    bad = gt + 1
    bad[2, 7, 0] = np.nan
    with pytest.raises(VisrecError, match="NaN"):  # an error, not a report with the metrics left out
        landmark_metrics(bad, gt)
