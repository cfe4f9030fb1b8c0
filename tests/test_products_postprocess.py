import numpy as np

from visrec.index.postprocess import DBA, AlphaQE


def test_dba_and_qe_known_answers():
    cat = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    out = DBA(k=2, alpha=0.0).apply(cat)
    # row 0: mean of itself and its nearest neighbour (0.6, 0.8), normalised
    expected0 = np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8])
    assert np.allclose(out[0], expected0)
    q = np.array([[1.0, 0.0]])
    qe = AlphaQE(k=1, alpha=1.0).fit(cat).apply(q)
    assert np.allclose(qe[0], [1.0, 0.0])  # neighbour is (1,0) itself -> unchanged direction
