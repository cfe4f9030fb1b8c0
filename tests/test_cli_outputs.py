"""Where commands write (--out, --submission): checked before any work, written or refused with an `error:`
naming the path (exit code 2, no traceback), never reported as written when nothing was; the FPR targets
every command takes (--target-fpr, a protocol's targets) checked the same way everywhere; options that would
be ignored are refused."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from conftest import run_cli, save_tiny_face_model, save_tiny_landmark_model


def refused(code, out, err, *names) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out, err
    text = err + out
    for name in names:
        assert str(name) in text, (name, text)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "face").mkdir()
    (root / "lm").mkdir()
    save_tiny_face_model(root / "face")
    save_tiny_landmark_model(root / "lm")
    return root / "face", root / "lm"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    from visrec.data.images import encode_jpeg

    path = tmp_path_factory.mktemp("picture") / "face.jpg"
    rng = np.random.default_rng(0)
    path.write_bytes(encode_jpeg(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)))
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """An LFR feature binary with its file list and labels (4 identities x 3 rows)."""
    from visrec.evaluate.lfr import write_lfr_features

    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(1)
    names = [f"{i // 3}/{i % 3}.jpg" for i in range(12)]
    write_lfr_features(root / "feat.bin", rng.standard_normal((12, 8)).astype(np.float32))
    (root / "filelist.txt").write_text("".join(f"{n}\n" for n in names))
    (root / "labels.csv").write_text("".join(f"{n},{n.split('/')[0]}\n" for n in names))
    return root


def feature_args(root):
    return ["--features", root / "feat.bin", "--filelist", root / "filelist.txt", "--labels", root / "labels.csv"]


# --- 1. visrec landmarks --out --------------------------------------------------------------------------------

def test_landmarks_writes_its_image_or_says_why_not(models, picture, tmp_path, monkeypatch, capsys):
    import cv2

    _, lm = models
    out = tmp_path / "nodir" / "x.png"
    code, text, err = run_cli(["landmarks", picture, "--model", lm, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert out.is_file() and cv2.imread(str(out)) is not None and f"drawn into {out}" in text

    code, text, err = run_cli(["landmarks", picture, "--model", lm, "--out", tmp_path / "pts.txt"], monkeypatch, capsys)
    refused(code, text, err, "pts.txt", "--out")
    assert not (tmp_path / "pts.txt").exists()

    code, text, err = run_cli(["landmarks", picture, "--model", lm, "--out", tmp_path], monkeypatch, capsys)
    refused(code, text, err, str(tmp_path))


def test_landmarks_default_output_never_replaces_a_file(models, picture, tmp_path, monkeypatch, capsys):
    _, lm = models
    monkeypatch.chdir(tmp_path)
    (tmp_path / "landmarks.png").write_bytes(b"mine")
    code, text, err = run_cli(["landmarks", picture, "--model", lm], monkeypatch, capsys)
    refused(code, text, err, "landmarks.png", "--out")
    assert (tmp_path / "landmarks.png").read_bytes() == b"mine"
    # named explicitly, the file is replaced and the output says so
    code, text, err = run_cli(["landmarks", picture, "--model", lm, "--out", "landmarks.png"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "landmarks.png").read_bytes()[:4] == b"\x89PNG" and "replaced" in text


def test_docs_and_code_agree_on_the_landmarks_default():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert "`visrec landmarks IMAGE --model LANDMARK_MODEL [--box x1,y1,x2,y2] [--out landmarks.png]`" in text


# --- 2. output paths that are a file, or lie under one ---------------------------------------------------------

def _cases(models, picture, features, tmp):
    face, lm = models
    photos = picture.parent
    return {
        "eval faces": (["eval", "faces", *feature_args(features)], "dir"),
        "eval faces --submission": (["eval", "faces", face, "--data", photos, "--filelist",
                                     features / "filelist.txt"], "submission"),
        "eval landmarks": (["eval", "landmarks", lm, "--data", tmp / "jd"], "dir"),
        "eval ijb": (["eval", "ijb", face, "--data", tmp / "ijb"], "file"),
        "eval products": (["eval", "products", tmp / "index", "--data", tmp / "products"], "dir"),
        "data synth faces": (["data", "synth", "faces", "--identities", "2", "--per-identity", "1"], "dir"),
        "data synth landmarks": (["data", "synth", "landmarks", "--faces", "1"], "dir"),
        "data synth products": (["data", "synth", "products", "--families", "1", "--products-per-family", "1",
                                 "--variants", "1", "--queries-per-product", "0", "--size", "32"], "dir"),
        "data synth videos": (["data", "synth", "videos", "--identities", "2", "--videos-per-identity", "1",
                               "--frames", "1"], "dir"),
        "data prepare faces": (["data", "prepare", "faces", photos], "dir"),
        "data prepare landmarks": (["data", "prepare", "landmarks", photos], "dir"),
        "data prepare products": (["data", "prepare", "products", photos], "dir"),
        "data prepare videos": (["data", "prepare", "videos", photos], "dir"),
        "export": (["export", face], "file"),
        "search faces": (["search", "faces", "--data", tmp / "d", "--val", tmp / "v", "--max-gflops", "1"], "dir"),
        "search export": (["search", "export", tmp / "run"], "file"),
        "landmarks": (["landmarks", picture, "--model", lm], "png"),
        "products index": (["products", "index", photos, "--model", face], "dir"),
        "demo": (["demo"], "dir"),
    }


CASES = ["eval faces", "eval faces --submission", "eval landmarks", "eval ijb", "eval products", "data synth faces",
         "data synth landmarks", "data synth products", "data synth videos", "data prepare faces",
         "data prepare landmarks", "data prepare products", "data prepare videos", "export", "search faces",
         "search export", "landmarks", "products index", "demo"]


@pytest.mark.parametrize("case", CASES)
def test_an_output_under_a_file_is_refused_before_any_work(case, models, picture, features, tmp_path, monkeypatch,
                                                           capsys):
    args, kind = _cases(models, picture, features, tmp_path)[case]
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"keep me")
    name = {"dir": "sub", "file": "r.json", "submission": "s.bin", "png": "x.png"}[kind]
    bad = blocker / name
    flag = "--submission" if kind == "submission" else "--out"
    code, out, err = run_cli([*args, flag, bad], monkeypatch, capsys)
    refused(code, out, err, bad, "blocker")
    assert blocker.read_bytes() == b"keep me"


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("eval ijb", "export", "search export", "landmarks",
                                                                 "eval faces --submission")])
def test_a_folder_output_that_is_a_file_is_refused_before_any_work(case, models, picture, features, tmp_path,
                                                                   monkeypatch, capsys):
    args, kind = _cases(models, picture, features, tmp_path)[case]
    assert kind == "dir"
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"keep me")
    code, out, err = run_cli([*args, "--out", blocker], monkeypatch, capsys)
    refused(code, out, err, blocker)
    assert blocker.read_bytes() == b"keep me"


def test_export_into_an_existing_folder_is_refused_first_and_leaves_nothing(models, tmp_path, monkeypatch, capsys):
    face, _ = models
    folder = tmp_path / "adir"
    folder.mkdir()
    code, out, err = run_cli(["export", face, "--out", folder, "--no-parity"], monkeypatch, capsys)
    refused(code, out, err, folder)
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_export_onnx_library_refuses_a_folder_before_exporting(models, tmp_path, monkeypatch):
    from visrec import export as ex
    from visrec.errors import VisrecError

    face, _ = models
    monkeypatch.setattr(ex, "load_model", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    with pytest.raises(VisrecError, match="folder"):
        ex.export_checkpoint(face, tmp_path)


# --- 3. the LFR feature binary: a regular file only -------------------------------------------------------------

def test_index_catalogue_refuses_a_file_as_its_folder_before_the_model_loads(models, picture, tmp_path):
    """The library call (what the command runs) made the folder after the descriptor loaded: a bare
    FileExistsError / NotADirectoryError traceback."""
    from visrec.errors import DataError
    from visrec.index.catalogue import index_catalogue

    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"keep me")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(DataError, match="blocker"):
            index_catalogue(picture.parent, out, checkpoint=tmp_path / "no-such-model")  # not loaded: not reached
    assert blocker.read_bytes() == b"keep me"


def test_features_from_a_device_are_refused(features, tmp_path, monkeypatch, capsys):
    link = tmp_path / "feat.bin"
    link.symlink_to("/dev/null")
    code, out, err = run_cli(["eval", "faces", "--features", link, "--filelist", features / "filelist.txt",
                              "--labels", features / "labels.csv", "--out", tmp_path / "ev"], monkeypatch, capsys)
    refused(code, out, err, link, "regular file")


# --- 5. target FPR: a finite number in (0, 1], checked when parsed and in the library -----------------------

BAD_FPR = ["0", "nan", "inf", "-1", "2", "-inf"]


@pytest.mark.parametrize("value", BAD_FPR)
def test_bad_target_fpr_is_refused_by_every_command(value, models, features, tmp_path, monkeypatch, capsys):
    face, _ = models
    for args in (["eval", "faces", *feature_args(features), "--out", tmp_path / "ev"],
                 ["eval", "faces", face, "--video", "--data", tmp_path / "videos.csv"],
                 ["eval", "ijb", face, "--data", tmp_path / "ijb"],
                 ["search", "faces", "--data", tmp_path / "d", "--val", tmp_path / "v", "--out", tmp_path / "run",
                  "--max-gflops", "1"]):
        code, out, err = run_cli([*args, "--target-fpr", value], monkeypatch, capsys)
        refused(code, out, err, "--target-fpr")
    code, out, err = run_cli(["eval", "ijb", face, "--data", tmp_path / "ijb", "--target-fpir", value],
                             monkeypatch, capsys)
    refused(code, out, err, "--target-fpir")
    assert not (tmp_path / "ev").exists() and not (tmp_path / "run").exists()


def test_a_protocol_with_a_bad_target_is_refused(features, tmp_path, monkeypatch, capsys):
    proto = tmp_path / "proto.yaml"
    proto.write_text("name: zero\ntask: faces\ntargets: [0]\n")
    code, out, err = run_cli(["eval", "faces", *feature_args(features), "-p", proto, "--out", tmp_path / "ev"],
                             monkeypatch, capsys)
    refused(code, out, err, "proto.yaml", "target")
    # every command that reads a protocol file refuses it (budget check and fit ran their whole counts)
    for args in (["budget", "check", "mbf"], ["budget", "fit", "mobilefacenet"]):
        code, out, err = run_cli([*args, "-p", proto], monkeypatch, capsys)
        refused(code, out, err, "proto.yaml", "targets[0] must be a false positive rate in (0, 1]")


@pytest.mark.parametrize("value", [0.0, math.nan, math.inf, -1.0, 2.0])
def test_library_functions_refuse_a_bad_target_before_any_work(value, models, tmp_path, monkeypatch):
    from visrec.errors import VisrecError
    from visrec.evaluate.verification import tpr_at_fpr, tpr_at_fpr_nearest, tpr_at_fpr_pairs
    from visrec.faces import calibrate as fc
    from visrec.index.gallery.calibration import calibrate
    from visrec.search.proxy import FaceScorer

    emb = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(VisrecError, match="target FPR"):
        tpr_at_fpr(emb, labels, (value,), device="cpu")
    with pytest.raises(VisrecError, match="target FPR"):
        tpr_at_fpr_pairs(np.linspace(-1, 1, 6), labels == 0, (value,))
    with pytest.raises(VisrecError, match="target FPR"):
        tpr_at_fpr_nearest(np.linspace(-1, 1, 6), np.array([1, 0, 1, 0, 1, 0], bool), (value,))
    with pytest.raises(VisrecError, match="target FPR"):
        FaceScorer(tmp_path / "val.bin", value)
    monkeypatch.setattr(fc, "embed_labelled", lambda *a, **k: pytest.fail("embedded before the target was checked"))
    face, _ = models
    with pytest.raises(VisrecError, match="target FPR"):
        fc.calibrate_model(face, tmp_path, value, write=False)
    with pytest.raises(VisrecError, match="target FPR"):
        calibrate(None, emb, labels, value)


def test_a_good_target_still_works(features, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["eval", "faces", *feature_args(features), "--target-fpr", "1", "--target-fpr", "0.1",
                              "--out", tmp_path / "ev"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "ev" / "report.html").exists()


# --- 7. data synth videos --format ------------------------------------------------------------------------------

def test_synth_videos_format_is_a_choice(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["data", "synth", "videos", "--out", tmp_path / "v", "--identities", "2",
                              "--videos-per-identity", "1", "--frames", "1", "--format", "bogus"], monkeypatch, capsys)
    refused(code, out, err, "bogus")
    assert not (tmp_path / "v").exists()


# --- 8. messages and options that would be ignored -------------------------------------------------------------

def test_eval_faces_refuses_options_it_would_ignore(models, features, tmp_path, monkeypatch, capsys):
    face, _ = models
    code, out, err = run_cli(["eval", "faces", face, *feature_args(features), "--out", tmp_path / "ev"],
                             monkeypatch, capsys)
    refused(code, out, err, "--features", "MODEL")
    code, out, err = run_cli(["eval", "faces", face, "--data", tmp_path, "--fusion", "norm", "--out", tmp_path / "ev"],
                             monkeypatch, capsys)
    refused(code, out, err, "--fusion", "--video")
    assert not (tmp_path / "ev").exists()
    code, out, err = run_cli(["eval", "faces", "--out", tmp_path / "ev"], monkeypatch, capsys)
    refused(code, out, err, "MODEL", "--features")
    assert "--model" not in err


def test_an_empty_ground_truth_names_its_file(tmp_path, monkeypatch, capsys):
    root = tmp_path / "products"
    (root / "query").mkdir(parents=True)
    (root / "val.csv").write_text("")
    code, out, err = run_cli(["eval", "products", tmp_path / "index", "--data", root, "--out", tmp_path / "ev"],
                             monkeypatch, capsys)
    refused(code, out, err, root / "val.csv")


def test_products_search_and_calibrate_refuse_bad_outputs_and_rates_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("mine")
    code, out, err = run_cli(["products", "search", tmp_path, "--index", tmp_path / "no-index",
                              "--out", tmp_path / "afile" / "s.csv"], monkeypatch, capsys)
    refused(code, out, err, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine"
    for args in (["gallery", "calibrate", "--config", tmp_path / "none.yaml", "--data", tmp_path],
                 ["models", "calibrate", tmp_path / "none.pt", "--data", tmp_path]):
        for rate in ("nan", "0", "-1", "2"):
            code, out, err = run_cli(args + ["--target-fpr", rate], monkeypatch, capsys)
            refused(code, out, err, "(0, 1]")


@pytest.mark.parametrize("command, args", [("gallery list", ["--config", "serve.yaml"]), ("data synth faces", []),
                                           ("budget check", ["mbf", "-p", "deepglint-light"]),
                                           ("serve", ["--config", "s.yaml"]), ("search export", ["runs/s"]),
                                           ("eval products", ["idx", "--data", "d"])])
def test_a_one_process_command_under_torchrun_stops_before_any_work(command, args, tmp_path, monkeypatch, capsys):
    """Only train, finetune, eval faces and products index split their work across torchrun processes; every
    other command stops (one rank of `gallery enroll` enrolled while the other failed on the open gallery)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_cli([*command.split(), *args], monkeypatch, capsys)
    refused(code, out, err, f"visrec {command} runs in one process, but torchrun started 2")
    assert not list(tmp_path.iterdir())


def test_a_process_that_started_a_process_group_ends_without_finalization(monkeypatch, capsys, tmp_path):
    """Under torchrun the gloo worker threads outlive destroy_process_group and one may still be releasing the
    last collective's tensors when Python finalizes, which aborted a finished rank (SIGABRT, 1 run in ~20): such
    a process ends with os._exit and its status, its output flushed; any other ends with SystemExit as before."""
    import visrec.distributed
    from visrec.cli import main

    class Ended(Exception):
        pass

    def exit_now(code):
        raise Ended(code)

    monkeypatch.setattr("os._exit", exit_now)
    monkeypatch.setattr(sys, "argv", ["visrec", "models", "info", str(tmp_path / "missing.pt")])
    monkeypatch.setattr(visrec.distributed, "started_a_process_group", True)
    with pytest.raises(Ended) as ended:
        main()
    assert ended.value.args == (2,) and "missing.pt" in "".join(capsys.readouterr().err.split())  # Rich wraps
    monkeypatch.setattr(sys, "argv", ["visrec", "--version"])
    with pytest.raises(Ended) as ended:
        main()
    assert ended.value.args == (0,)
    monkeypatch.setattr(visrec.distributed, "started_a_process_group", False)
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0


@pytest.mark.parametrize("group", [True, False])
def test_end_process_is_what_a_program_calling_visrec_under_torchrun_ends_with(group):
    """visrec.distributed.end_process: after a process group, the status and the flushed output, no finalization
    (an atexit handler does not run); without one, an ordinary exit."""
    import subprocess

    code = ("import atexit, sys\nimport visrec.distributed as d\n"
            f"d.started_a_process_group = {group}\n"
            "atexit.register(lambda: print('finalized'))\n"
            "print('trained', end='')\nsys.stderr.write('to stderr')\nd.end_process(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout.startswith("trained") and done.stderr == "to stderr"
    assert ("finalized" in done.stdout) is not group
