"""The organisers' files as distributed: val.csv with a UTF-8 BOM, a header line and CRLF line ends.

The layout copied here is that of the AI Meets Beauty validation ground truth as redistributed on GitHub
(FangxiangFeng/AI-Meets-Beauty-2020, Challenge_validation_set_2020/val_2020.csv): BOM, the header
``Validation Image ID,Training Image ID``, ``\\r\\n`` after every line including the last.
"""

import pytest
from typer.testing import CliRunner

from visrec.data import products as P
from visrec.data.synth_products import write_product_dataset
from visrec.errors import DataError
from visrec.evaluate.retrieval import map_at_k


def _distributed(gt: dict[str, list[str]], sep: str = ",") -> bytes:
    rows = ["Validation Image ID,Training Image ID"] + [sep.join([q, *ids]) for q, ids in gt.items()]
    return b"\xef\xbb\xbf" + "".join(r + "\r\n" for r in rows).encode()


GT = {"v000101": ["n0292431"], "v000104": ["n0185640", "n0535953", "n0186115"], "v000105": ["n0379577", "n0114734"]}


@pytest.mark.parametrize("sep", [",", ", "])
def test_distributed_val_csv_reads_like_the_clean_file(tmp_path, sep):
    f = tmp_path / "val.csv"
    f.write_bytes(_distributed(GT, sep))
    assert f.read_bytes().startswith(b"\xef\xbb\xbfValidation Image ID,Training Image ID\r\nv000101,")
    assert P.read_ground_truth(f) == GT


def test_header_is_detected_by_content_not_position(tmp_path):
    f = tmp_path / "val.csv"
    f.write_bytes(b"\xef\xbb\xbfv000101,n0292431\r\nv000102,n0500251\r\n")   # no header: row 1 is data
    assert P.read_ground_truth(f) == {"v000101": ["n0292431"], "v000102": ["n0500251"]}
    for header in ("query_id,gt", "qid,ids", "QueryId , catalogue ids", "image id,training image id"):
        f.write_text(f"\n{header}\nv1,a,b\n")
        assert P.read_ground_truth(f) == {"v1": ["a", "b"]}, header
    # a header-like line after the first data row is data, and so an error naming its line
    f.write_text("v1,a\nValidation Image ID,Training Image ID\nqid\n")
    with pytest.raises(DataError) as e:
        P.read_ground_truth(f)
    assert e.value.record == "line 3" and str(f) in str(e.value)


def test_spreadsheet_padding_and_empty_fields(tmp_path):
    f = tmp_path / "val.csv"
    f.write_text("Validation Image ID,Training Image ID,,\nv1,a,,\nv2,b,c,\n")
    assert P.read_ground_truth(f) == {"v1": ["a"], "v2": ["b", "c"]}
    f.write_text("v1,a,,b\n")
    with pytest.raises(DataError, match="empty") as e:
        P.read_ground_truth(f)
    assert e.value.record == "line 1"


def test_submission_reader_takes_header_crlf_and_comma_space(tmp_path):
    f = tmp_path / "sub.csv"
    ids = [f"n{i:07d}" for i in range(7)]
    f.write_bytes(b"\xef\xbb\xbfquery_id,result\r\n" + ("v000101, " + ", ".join(ids) + "\r\n").encode())
    assert P.read_submission(f) == {"v000101": ids}
    f.write_bytes(("v000101," + ",".join(ids) + "\r\n").encode())     # the first row is data without a header
    assert P.read_submission(f) == {"v000101": ids}
    f.write_bytes(b"Validation Image ID,Training Image ID\r\nv1,a,b\r\n")
    with pytest.raises(DataError, match="2 ids after the query id, expected 7") as e:
        P.read_submission(f)
    assert e.value.record == "line 2"


def test_map_and_eval_products_on_the_distributed_layout(tmp_path):
    from visrec.cli import app

    root = tmp_path / "p"
    write_product_dataset(root, families=2, products_per_family=2, variants=2, queries_per_product=1, seed=1, size=64)
    clean = P.read_ground_truth(root / P.GROUND_TRUTH)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: {name: product, backbone: resnet18, pooling: gem, dim: 16}\nschedule: {max_steps: 1}\n"
                   "index: {size: 64, postprocess: []}\n")
    run = CliRunner().invoke
    r = run(app, ["products", "index", str(root / "catalogue"), "--config", str(cfg), "--out", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.output
    r = run(app, ["eval", "products", str(tmp_path / "idx"), "--data", str(root), "--out", str(tmp_path / "clean")])
    assert r.exit_code == 0, r.output
    ranked = P.read_submission(tmp_path / "clean" / "submission.csv")
    (root / P.GROUND_TRUTH).write_bytes(_distributed(clean))
    assert P.read_ground_truth(root / P.GROUND_TRUTH) == clean
    assert map_at_k(ranked, P.read_ground_truth(root / P.GROUND_TRUTH)) == map_at_k(ranked, clean)
    r = run(app, ["eval", "products", str(tmp_path / "idx"), "--data", str(root), "--out", str(tmp_path / "dist")])
    assert r.exit_code == 0, r.output
    assert "have no image" not in r.output
    assert P.read_submission(tmp_path / "dist" / "submission.csv") == ranked
    from visrec.index.evaluation import evaluate_products
    a = evaluate_products(tmp_path / "idx", root, tmp_path / "again", samples=0)
    assert a.queries == len(clean) == 4
    assert a.metrics["map@7_hits"] == pytest.approx(map_at_k(ranked, clean, 7, "hits"))
    assert a.metrics["map@7_min_gt"] == pytest.approx(map_at_k(ranked, clean, 7, "min_gt"))
