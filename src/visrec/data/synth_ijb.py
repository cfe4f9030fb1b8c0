"""A synthetic IJB-C (or IJB-B) release in the real layout, rendered with ``visrec.data.synth``'s faces.

Written under ``root`` exactly as InsightFace's IJB scripts read the real release (see
``visrec.evaluate.ijb``): ``loose_crop/<n>.jpg`` and, in ``meta/`` (prefix ``ijbc`` or ``ijbb``),
``<p>_face_tid_mid.txt``, ``<p>_name_5pts_score.txt``, ``<p>_template_pair_label.txt`` and the 1:N files
``<p>_1N_gallery_G1.csv`` / ``_G2.csv`` (IJB-B: ``_S1`` / ``_S2``) and ``<p>_1N_probe_mixed.csv``.

Content: ``num_subjects`` identities (``visrec.data.synth`` identities ``first_identity + s``, held out from
training sets that start at 0), each with ``templates_per_subject`` templates of 1-2 media; a media is a
photo (one image) or a video (two frames). Every image is a fresh rendering placed, scaled and shifted
into a larger ``canvas`` x ``canvas`` loose crop; its five alignment points (eye centres, nose tip, mouth
corners, from the renderer's exact 106 landmarks) are transformed with the same matrix, so aligning a loose
crop with its points gives back the ArcFace-aligned face. Detector scores are drawn in [0.6, 1].

1:1 pairs: every pair of templates of one subject (label 1) and ``impostor_ratio`` times as many distinct
pairs of templates of different subjects (label 0). 1:N: gallery G1 (S1) = the first template of each
even-numbered subject, G2 (S2) = of each odd one; probes = every other template.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from visrec._files import names_its_output
from visrec.data.images import write_image
from visrec.data.schemes import to_five_points
from visrec.data.synth import render_face


@names_its_output
def write_synthetic_ijb(root: str | Path, num_subjects: int = 6, templates_per_subject: int = 3, *,
                        target: str = "IJBC", seed: int = 0, difficulty: float = 0.2,
                        first_identity: int = 200_000, impostor_ratio: int = 3, canvas: int = 160) -> Path:
    """Write the release under ``root`` (module docstring); returns ``root``."""
    if num_subjects < 2 or templates_per_subject < 2:
        raise ValueError("needs at least 2 subjects (impostor pairs) and 2 templates per subject (gallery + probe)")
    prefix = {"IJBC": "ijbc", "IJBB": "ijbb"}[target.upper().replace("-", "")]
    root = Path(root)
    crops, meta = root / "loose_crop", root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, first_identity, 4242])
    tid_mid, five_lines = [], []
    templates: list[tuple[int, int, list[str]]] = []  # (template id, subject id, image names)
    n_img, tid, mid = 0, 0, 1000
    for s in range(num_subjects):
        subject = 1000 + s
        for _ in range(templates_per_subject):
            tid += 1
            names = []
            for _ in range(int(rng.integers(1, 3))):
                mid += 1
                for _ in range(1 if rng.uniform() < 0.5 else 2):
                    n_img += 1
                    name = f"{n_img}.jpg"
                    face, pts = render_face(first_identity + s, rng, difficulty, seed)
                    scale = rng.uniform(0.9, 1.2)
                    offset = (canvas - 112 * scale) / 2 + rng.uniform(-8, 8, 2)
                    m = np.array([[scale, 0, offset[0]], [0, scale, offset[1]]])
                    img = cv2.warpAffine(face, m, (canvas, canvas), flags=cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_REFLECT)
                    five = to_five_points(pts @ m[:, :2].T + m[:, 2], "jd106")
                    write_image(crops / name, img)
                    tid_mid.append(f"{name} {tid} {mid}")
                    coords = " ".join(f"{v:.3f}" for v in five.reshape(-1))
                    five_lines.append(f"{name} {coords} {rng.uniform(0.6, 1.0):.6f}")
                    names.append(name)
            templates.append((tid, subject, names))
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(five_lines) + "\n")

    by_subject: dict[int, list[int]] = {}
    for t, subj, _ in templates:
        by_subject.setdefault(subj, []).append(t)
    genuine = [(a, b) for ts in by_subject.values() for i, a in enumerate(ts) for b in ts[i + 1:]]
    subject_of = {t: subj for t, subj, _ in templates}
    all_t = [t for t, _, _ in templates]
    impostors: set[tuple[int, int]] = set()
    want = min(impostor_ratio * len(genuine), sum(1 for a in all_t for b in all_t if a < b and subject_of[a] != subject_of[b]))
    while len(impostors) < want:
        a, b = sorted(int(x) for x in rng.choice(all_t, 2, replace=False))
        if subject_of[a] != subject_of[b]:
            impostors.add((a, b))
    pairs = [f"{a} {b} 1" for a, b in genuine] + [f"{a} {b} 0" for a, b in sorted(impostors)]
    order = rng.permutation(len(pairs))
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(pairs[i] for i in order) + "\n")

    g_names = ("G1", "G2") if prefix == "ijbc" else ("S1", "S2")
    galleries: list[list[str]] = [[], []]
    probes: list[str] = []
    first_of = {subj: ts[0] for subj, ts in by_subject.items()}
    for t, subj, names in templates:
        rows = [f"{t},{subj},{n}" for n in names]
        if first_of[subj] == t:
            galleries[(subj - 1000) % 2] += rows
        else:
            probes += rows
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    for g, rows in zip(g_names, galleries):
        (meta / f"{prefix}_1N_gallery_{g}.csv").write_text(header + "\n".join(rows) + "\n")
    (meta / f"{prefix}_1N_probe_mixed.csv").write_text(header + "\n".join(probes) + "\n")
    return root
