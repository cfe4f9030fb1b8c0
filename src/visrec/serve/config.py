"""``visrec serve --config serve.yaml``: what the service loads and how it guards itself.

API keys come from ``api_keys`` or the ``VISREC_API_KEYS`` environment variable (comma-separated); they
are required whenever the server binds to anything but loopback, checked on every ``/v1`` request in
the ``X-API-Key`` header, and never logged.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from visrec.config import read_yaml_mapping, validate_section
from visrec.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GalleryConfig(_Strict):
    backend: str = Field("milvus", description="milvus (Milvus Lite file or cluster URI) | faiss (in memory)")
    uri: str = Field("gallery.db", description="Milvus Lite file, or http://host:19530 for a cluster")
    collection: str = "visrec_faces"
    fusion: str = Field("max", pattern="^(max|mean)$", description="template fusion per identity")


class FacesConfig(_Strict):
    model: Path = Field(description="face embedder: visrec checkpoint (run dir / model.pt), .onnx, or "
                                    "dlib-resnet (visrec[dlib])")
    aligned: bool = Field(False, description="uploads are aligned 112x112 crops (no detection)")
    detector: str = Field("haar", description="haar (OpenCV's bundled cascade) | an ONNX face detector file "
                                              "(SCRFD or YuNet outputs; scrfd:PATH / yunet:PATH to force one) | "
                                              "dlib-hog | dlib-cnn")
    landmarks: Path | None = Field(None, description="landmark checkpoint, or dlib-68 / dlib-5, used for "
                                                     "alignment when the detector gives no 5 points")
    align: Optional[str] = Field(None, pattern="^(lstsq|eyes)$",
                                 description="5 points -> ArcFace crop: lstsq (least squares, InsightFace's) or "
                                             "eyes (eyes exactly on the template); default: the one the model's "
                                             "contract records (lstsq when it records none)")
    detect_size: Optional[int] = Field(640, ge=0, description="faces are found on a copy scaled to this longest "
                                                               "side in pixels (0 or null: the full image), then "
                                                               "aligned on the full image")
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    top_k: int = Field(5, gt=0)


class LandmarksConfig(_Strict):
    model: Path


class ProductsConfig(_Strict):
    index: Path = Field(description="index directory from visrec products index")
    top_k: int = Field(7, gt=0)


class LimitsConfig(_Strict):
    """What one request may cost; each limit answers 413 (408 for the deadline) naming itself."""

    max_body_mb: float = Field(10.0, gt=0, description="request body in MB (10^6 bytes), counted while it "
                                                       "streams in, chunked or not")
    max_pixels: int = Field(40_000_000, gt=0, description="pixels of one image (width x height, from its header)")
    max_images: int = Field(16, gt=0, le=1000, description="images in one request (enroll takes several)")
    max_request_pixels: int = Field(100_000_000, gt=0, description="pixels of all images of one request, "
                                                                   "checked from their headers before decoding")
    body_timeout_s: float = Field(60.0, gt=0, description="seconds to receive a request body (slow clients)")
    max_concurrent: int = Field(4, gt=0, le=256, description="requests doing image work at once; others wait "
                                                             "without holding a thread")


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    faces: FacesConfig | None = None
    landmarks: LandmarksConfig | None = None
    products: ProductsConfig | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    def keys(self) -> set[str]:
        """The configured keys; an empty or blank one (in ``api_keys`` or ``VISREC_API_KEYS``) is a
        :class:`ConfigError`: it would let an empty header in."""
        env = os.environ.get("VISREC_API_KEYS")
        from_env = [] if env is None or not env.strip() else env.split(",")
        for where, keys in (("api_keys", self.api_keys), ("VISREC_API_KEYS", from_env)):
            if any(not isinstance(k, str) or not k.strip() for k in keys):
                raise ConfigError(f"{where} holds an empty or blank API key: every key must be a non-blank string")
        return set(self.api_keys) | {k.strip() for k in from_env}

    def check(self) -> "ServeConfig":
        if not is_loopback(self.host) and not self.keys():
            raise ConfigError(f"serving on {self.host} (not loopback) needs an API key: set api_keys in the "
                              f"config or VISREC_API_KEYS")
        if not (self.faces or self.landmarks or self.products):
            raise ConfigError("nothing to serve: configure faces, landmarks and/or products")
        return self


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_config(path: str | Path, overrides: dict | None = None) -> ServeConfig:
    return validate_section(ServeConfig, read_yaml_mapping(path, overrides), "serve", str(path)).check()
