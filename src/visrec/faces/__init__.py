"""The face layer: decode an image, detect faces, find their points, align, embed (:mod:`.pipeline`).

Below the gallery (``visrec.index``) and the service (``visrec.serve``), which use it; above the models."""
