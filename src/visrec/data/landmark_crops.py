"""Face-box crops of a JD-landmark directory as a torch ``Dataset`` (:class:`JDCrops`): what the landmark
task trains and validates on and what ``visrec eval landmarks`` scores, with the crop margin / size of the
model's contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visrec.data.augment import crop_face, random_augment
from visrec.data.images import read_image
from visrec.data.landmarks import read_jd_dir, read_jd_poses
from visrec.data.schemes import get_scheme
from visrec.errors import DataError


class JDCrops(Dataset):
    """Face-box crops of a JD-landmark set; items: (image tensor in [-1, 1], points normalised to [0, 1]),
    plus the (yaw, pitch, roll) pose in radians (float32 (3,)) when ``with_pose``. ``poses`` holds the
    set's poses in degrees, or None when it has no ``pose/`` directory."""

    def __init__(self, root: Path, points: int, size: int, margin: float, augment: bool, seed: int = 0,
                 with_pose: bool = False):
        self.paths, self.points, self.boxes = read_jd_dir(root, points)
        self.poses = read_jd_poses(root, self.paths)
        if with_pose and self.poses is None:
            raise DataError("no head-pose ground truth (pose/<image>.txt, 'yaw pitch roll' in degrees; "
                            "visrec.data.synth.write_synthetic_jd writes it)", path=Path(root) / "pose")
        self.size, self.margin, self.augment, self.with_pose = size, margin, augment, with_pose
        # only the flip augmentation needs the scheme (its left/right pairs): any point count evaluates
        self.flip_perm = get_scheme(points).flip_perm if augment else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def crop(self, i: int):
        return crop_face(read_image(self.paths[i]), self.points[i], self.boxes[i], self.size, self.margin)

    def __getitem__(self, i: int):
        img, pts = self.crop(i)  # a scaled, shifted copy of the image: the pose is unchanged
        pose = self.poses[i] if self.with_pose else None
        if self.augment:
            # drawn from torch's RNG (checkpointed by the Trainer), so resumed runs augment alike
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
            # a flip negates yaw and roll, a rotation adds to roll (visrec.data.augment)
            out = random_augment(img, pts, self.flip_perm, rng, max_angle=15, p_occlude=0.2, pose=pose)
            img, pts = out[:2]
            pose = out[2] if pose is not None else None
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1)
        y = torch.from_numpy(pts / self.size).float()
        if pose is None:
            return x, y
        return x, y, torch.from_numpy(np.radians(np.asarray(pose, np.float64))).float()
