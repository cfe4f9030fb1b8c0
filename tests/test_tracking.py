"""visrec.faces.tracking on a synthetic video: two identities walk across a canvas in opposite directions and cross,
the front one hiding the other for a few frames. A fake detector returns the true boxes and 5 points (shuffled
order, the hidden face missed) and a fake embedder maps each crop to its identity's vector, so the test checks
association, not detector or embedder quality."""


import cv2
import numpy as np
import pytest

from visrec.faces import tracking
from visrec.faces.align import ARCFACE_112, five_points
from visrec.faces.detectors import Detection
from visrec.data.synth import render_face
from visrec.faces.tracking import Track, assign, iou_matrix, iter_frames, track_video, video_to_tracks
from visrec.errors import DataError, VisrecError

A, B = 6, 7                 # synth identities; A walks left -> right in front, B right -> left behind
W, H, T = 480, 260, 21      # canvas and frame count; the paths cross at frame 10
HIDDEN = {9, 10, 11}        # frames where A covers B's face centre: B is not detected


def _tile(identity):
    img, pts = render_face(identity, np.random.default_rng([identity, 5]), difficulty=0.0)
    return img, pts


def _positions(t):
    return {A: (round(20 + 16.4 * t), 60), B: (round(348 - 16.4 * t), 72)}


def make_video():
    """(frames, truth): truth[t] = {identity: (box, 5 points, score)} of the faces detected in frame t."""
    tiles = {i: _tile(i) for i in (A, B)}
    frames, truth = [], []
    for t in range(T):
        canvas = np.full((H, W, 3), 90, np.uint8)
        canvas[:, :, 2] = np.linspace(40, 200, W, dtype=np.uint8)[None, :]
        found = {}
        for ident in (B, A):  # A pasted last: in front
            img, pts = tiles[ident]
            x, y = _positions(t)[ident]
            canvas[y:y + 112, x:x + 112] = img
            if not (ident == B and t in HIDDEN):
                score = (0.9 if ident == A else 0.7) + 0.004 * t
                found[ident] = (np.array([x, y, x + 112, y + 112], np.float32),
                                five_points(pts + (x, y), "jd106"), score)
        frames.append(canvas)
        truth.append(found)
    return frames, truth


class FakeDetector:
    """Frame t's true faces in a shuffled order (frames arrive in order, so the call count is the index)."""

    def __init__(self, truth):
        self.truth, self.t, self.rng = truth, 0, np.random.default_rng(3)

    def __call__(self, image):
        found = [Detection(box.copy(), score, pts.copy()) for box, pts, score in self.truth[self.t].values()]
        self.t += 1
        return [found[k] for k in self.rng.permutation(len(found))]


class FakeEmbedder:
    """A fixed random unit vector per identity, chosen by which identity's aligned face the crop correlates
    with best, plus a little noise: (N, 112, 112, 3) uint8 -> (N, 64)."""

    def __init__(self):
        from visrec.faces.align import align_face

        rng = np.random.default_rng(11)
        self.refs = []
        for ident in (A, B):
            img, pts = _tile(ident)
            self.refs.append(self._zero_mean(align_face(img, five_points(pts, "jd106"))[0]))
        self.vectors = rng.standard_normal((2, 64))
        self.vectors /= np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.rng = rng

    @staticmethod
    def _zero_mean(crop):
        x = crop.astype(np.float64).ravel()
        x -= x.mean()
        return x / np.linalg.norm(x)

    def __call__(self, crops):
        out = []
        for crop in crops:
            ncc = [ref @ self._zero_mean(crop) for ref in self.refs]
            out.append(self.vectors[int(np.argmax(ncc))] + 0.05 * self.rng.standard_normal(64))
        return np.stack(out)


def identities_of(track, truth):
    """The identity of each of the track's detections (boxes are the true ones, so exact matching works)."""
    out = []
    for f, box in zip(track.frames, track.boxes):
        out.append(next(i for i, (b, _, _) in truth[f].items() if np.array_equal(b, box)))
    return out


@pytest.fixture(scope="module")
def video():
    return make_video()


def test_embeddings_keep_identities_through_the_crossing(video):
    frames, truth = video
    tracks = track_video(frames, FakeDetector(truth), FakeEmbedder())
    assert len(tracks) == 2
    ids = [identities_of(t, truth) for t in tracks]
    assert [set(i) for i in ids] == [{A}, {B}] or [set(i) for i in ids] == [{B}, {A}]  # each track pure
    by_ident = {i[0]: t for i, t in zip(ids, tracks)}
    assert by_ident[A].frames == list(range(T))
    assert by_ident[B].frames == [t for t in range(T) if t not in HIDDEN]  # survives the gap
    assert np.allclose(by_ident[B].scores, [0.7 + 0.004 * t for t in by_ident[B].frames])
    crop = by_ident[A].crops[0]
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8


def test_track_crops_use_the_chosen_alignment(video):
    from visrec.faces.align import align_face
    from visrec.errors import VisrecError

    frames, truth = video
    lstsq = track_video(frames[:2], FakeDetector(truth), None)
    eyes = track_video(frames[:2], FakeDetector(truth), None, align="eyes")
    for t_ls, t_eyes in zip(lstsq, eyes):
        box = t_eyes.boxes[0]
        five = next(p for b, p, _ in truth[t_eyes.frames[0]].values() if np.array_equal(b, box))
        np.testing.assert_array_equal(t_eyes.crops[0], align_face(frames[t_eyes.frames[0]], five, method="eyes")[0])
        assert np.abs(t_eyes.crops[0].astype(int) - t_ls.crops[0]).max() > 0
    with pytest.raises(VisrecError, match="unknown alignment method"):
        track_video([], FakeDetector(truth), None, align="eye")


def test_iou_alone_swaps_them_at_the_crossing(video):
    """Without appearance, B's stale box (from before it was hidden) overlaps where A is when B reappears more
    than A's own last box overlaps B: the total-IoU optimum swaps the two tracks at frame 12."""
    frames, truth = video
    tracks = track_video(frames, FakeDetector(truth), None)
    ids = [identities_of(t, truth) for t in tracks]
    assert len(tracks) == 2
    for track, idents in zip(tracks, ids):
        before = [i for f, i in zip(track.frames, idents) if f < 12]
        after = [i for f, i in zip(track.frames, idents) if f >= 12]
        assert len(set(before)) == len(set(after)) == 1 and before[0] != after[0]  # swapped at 12


# the optimum (0, 1) + (1, 0) = 1.5, where taking the best pair (0, 0) = 0.9 first leaves nothing
GREEDY_CASE = (np.array([[0.9, 0.8], [0.7, 0.0]]), np.array([[True, True], [True, False]]))


def test_assign_and_iou():
    assert assign(*GREEDY_CASE) == [(0, 1), (1, 0)]
    assert assign(GREEDY_CASE[0], np.zeros((2, 2), bool)) == []
    assert np.allclose(iou_matrix([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30]]), [[1 / 3, 0]])


def test_video_to_tracks_writes_a_video_set(video, tmp_path):
    from visrec.data.video import read_frame_scores, read_frames, read_video_list

    frames, truth = video
    folder = tmp_path / "clip01"
    folder.mkdir()
    for t, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{t:04d}.png"), f[:, :, ::-1])
    out = tmp_path / "set"
    written = video_to_tracks(folder, out, FakeDetector(truth), FakeEmbedder(), min_len=5,
                              label=lambda track: f"person{track.id}")
    assert [vid for vid, _ in written] == ["clip01_t000", "clip01_t001"]
    items = read_video_list(out / "videos.csv")  # visrec's own reader
    assert [(it.video_id, it.label) for it in items] == [("clip01_t000", "person0"), ("clip01_t001", "person1")]
    lengths = sorted(len(read_frames(it.path, it.video_id)) for it in items)
    assert lengths == [T - len(HIDDEN), T]
    for it in items:
        crops = read_frames(it.path, it.video_id)
        scores = read_frame_scores(it.path, len(crops))
        base = 0.9 if len(crops) == T else 0.7
        assert scores is not None and scores.min() >= base and scores.max() <= base + 0.004 * T
        # aligned: the pupils sit near the ArcFace template's eyes in every crop
        gray = cv2.cvtColor(crops[0], cv2.COLOR_RGB2GRAY)
        for ex, ey in ARCFACE_112[:2]:
            x, y = int(round(ex)), int(round(ey))
            assert gray[y - 3:y + 4, x - 3:x + 4].min() < 60
    assert (out / "video_filelist.txt").read_text() == "clip01_t000\nclip01_t001\n"
    assert not any(p.name.startswith(".") for p in (out / "videos").iterdir())  # staging removed

    # a second video appends, keeping what the user wrote into the list (comment lines were dropped); the same
    # video again is refused
    listed = (out / "videos.csv").read_text()
    (out / "videos.csv").write_text("# tracks of clip01, checked by hand\n" + listed.replace("\n", "\r\n", 1)
                                    + "\n# end of clip01")
    more = video_to_tracks(iter(frames[:10]), out, FakeDetector(truth), None, video_id="clip02", min_len=10)
    assert [vid for vid, _ in more] == ["clip02_t000"]  # B (9 frames before it hides) is too short
    assert (out / "videos.csv").read_bytes().decode().startswith("# tracks of clip01, checked by hand\n"
                                                       + listed.replace("\n", "\r\n", 1) + "\n# end of clip01\n")
    assert [it.video_id for it in read_video_list(out / "videos.csv")][-1] == "clip02_t000"
    assert read_video_list(out / "videos.csv")[-1].label == "clip02_t000"  # default label: the track itself
    with pytest.raises(VisrecError, match="already holds tracks"):
        video_to_tracks(folder, out, FakeDetector(truth), None)


def test_a_failure_part_way_leaves_the_video_set_as_it_was(video, tmp_path):
    """A detector error at frame 6 used to leave the staging folder of crops behind; a label refused on the second
    track left the first track's folder in videos/ with no videos.csv row, and the next run refused the video."""
    frames, truth = video
    out = tmp_path / "set"

    class Failing(FakeDetector):
        def __call__(self, image):
            if self.t == 6:
                raise VisrecError("the detector failed")
            return super().__call__(image)

    with pytest.raises(VisrecError, match="the detector failed"):
        video_to_tracks(iter(frames), out, Failing(truth), None, video_id="clip")
    assert not (out / "videos").exists() or not any((out / "videos").iterdir())
    with pytest.raises(VisrecError, match="label 'a,b' of track clip_t001"):
        video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="clip",
                        label=lambda t: "ok" if t.id == 0 else "a,b")
    assert not any((out / "videos").iterdir()) and not (out / "videos.csv").exists()
    assert len(video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="clip")) == 2  # runs again


def test_a_rerun_with_resume_goes_on_where_a_killed_run_stopped(video, tmp_path):
    """`visrec data prepare videos` says it is resumable, but its rerun refused every video a killed run had
    finished ("already holds tracks"), and a kill between videos.csv and video_filelist.txt left the file list
    short for good. With resume: finished videos are kept as they are (their file-list lines restored), and
    track folders moved in without their rows are redone."""
    from visrec.data.video import read_video_list

    frames, truth = video
    out = tmp_path / "set"
    first = video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="a", min_len=5)
    (out / "video_filelist.txt").write_text("")  # killed after videos.csv was replaced, before the file list
    assert video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="a", min_len=5, resume=True) \
        == first
    assert (out / "video_filelist.txt").read_text() == "a_t000\na_t001\n"
    video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="b", min_len=5)
    rows = (out / "videos.csv").read_text().splitlines()
    (out / "videos.csv").write_text("\n".join(r for r in rows if not r.startswith("b_t")) + "\n")  # killed before b's rows
    with pytest.raises(VisrecError, match="already holds tracks of video 'b'"):
        video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="b", min_len=5)
    again = video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="b", min_len=5, resume=True)
    assert [vid for vid, _ in again] == ["b_t000", "b_t001"]
    assert [it.video_id for it in read_video_list(out / "videos.csv")] == ["a_t000", "a_t001", "b_t000", "b_t001"]
    assert (out / "video_filelist.txt").read_text() == "a_t000\na_t001\nb_t000\nb_t001\n"
    # a video whose name begins like another's tracks ('a_tx' -> 'a_tx_t000') is not taken for them
    video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="a_tx", min_len=5, resume=True)
    rows = (out / "videos.csv").read_text().splitlines()
    (out / "videos.csv").write_text("\n".join(r for r in rows if not r.startswith("a_t0")) + "\n")
    again = video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="a", min_len=5, resume=True)
    assert [vid for vid, _ in again] == ["a_t000", "a_t001"] and (out / "videos" / "a_tx_t000").is_dir()
    assert {it.video_id for it in read_video_list(out / "videos.csv")} == {"a_t000", "a_t001", "b_t000", "b_t001",
                                                                          "a_tx_t000", "a_tx_t001"}
    # a folder of the user's named like a track and not listed was removed as a killed run's leftover, notes and all
    mine = out / "videos" / "c_t007"
    mine.mkdir()
    (mine / "000000.png").write_bytes(b"a frame")
    (mine / "NOTES.txt").write_text("keep me")
    with pytest.raises(VisrecError, match="c_t007 is named like a track of video 'c' but is not listed"):
        video_to_tracks(iter(frames), out, FakeDetector(truth), None, video_id="c", min_len=5, resume=True)
    assert (mine / "NOTES.txt").read_text() == "keep me"


def write_avi(path, frames):
    """``frames`` (RGB) as an MJPG .avi at ``path``."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    for f in frames:
        writer.write(f[:, :, ::-1])
    writer.release()
    return path


def test_iter_frames_reads_video_files(tmp_path, video):
    frames, _ = video
    path = write_avi(tmp_path / "clip.avi", frames[:5])
    got = list(iter_frames(path))
    assert len(got) == 5 and got[0].shape == (H, W, 3)
    assert np.abs(got[2].astype(float) - frames[2]).mean() < 6  # MJPG is lossy; RGB order kept
    assert isinstance(Track(0), Track) and len(Track(0)) == 0
    assert tracking.CROP_SIZE == 112


def test_a_video_or_frame_folder_whose_name_is_not_utf8_is_refused_not_a_crash(tmp_path, video):
    """OpenCV's video reader and image writer ended the process with SIGSEGV (exit 139, no message) on a name
    holding a byte that is not UTF-8, on every rerun; both are refused naming the file."""
    import os

    from visrec.faces.tracking import iter_frames

    frames, truth = video
    clip = write_avi(tmp_path / "clip.avi", frames[:5])
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"bad\xffclip.avi"))
    os.rename(clip, odd)
    with pytest.raises(DataError, match="not UTF-8 text, which OpenCV cannot open"):
        next(iter(iter_frames(odd)))
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"fr\xfeames"))
    os.mkdir(folder)
    with pytest.raises(VisrecError, match="UTF-8 text"):
        video_to_tracks(folder, tmp_path / "set", FakeDetector(truth), None)
    assert not (tmp_path / "set").exists() or not any((tmp_path / "set").rglob("*"))


def test_two_videos_with_one_stem_in_one_run_are_refused(tmp_path):
    """`prepare videos a/clip.mp4 b/clip.mp4` took b's clip for a's, finished, and skipped it without a word."""
    from visrec.faces.tracking import check_distinct_video_ids

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clip.mp4").write_bytes(b"not read")
    check_distinct_video_ids([tmp_path / "a" / "clip.mp4", tmp_path / "b"])
    with pytest.raises(DataError, match="would both be video 'clip'"):
        check_distinct_video_ids([tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"])



def test_a_file_where_the_track_folders_go_is_refused_before_tracking(video, tmp_path):
    frames, truth = video
    out = tmp_path / "set"
    out.mkdir()
    (out / "videos").write_text("the user's file")

    class Untouched(FakeDetector):
        def __call__(self, image):
            raise AssertionError("tracking began")

    with pytest.raises(DataError, match="videos: must be the folder of track folders; this is a file"):
        video_to_tracks(iter(frames), out, Untouched(truth), None, video_id="clip")
    assert (out / "videos").read_text() == "the user's file"
