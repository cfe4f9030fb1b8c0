"""visrec: lightweight face recognition, 106-point landmarks and beauty-product retrieval.

One path from data to service: data -> models -> train -> budget -> evaluate -> export -> faces ->
index -> serve.  See docs/design.md for the layout and docs/metrics.md for metric definitions.

The Python API (:mod:`visrec.api`): ``FaceAnalysis``, ``verify``, ``Gallery``, ``load_image``, and
``load_model`` (:mod:`visrec.models`). They are imported on first use, so ``import visrec`` stays light.
"""

__version__ = "0.1.0"

_API = {"FaceAnalysis": "visrec.api", "verify": "visrec.api", "Gallery": "visrec.api", "load_image": "visrec.faces.images",
        "Verdict": "visrec.api", "load_model": "visrec.models"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'visrec' has no attribute {name!r}")
