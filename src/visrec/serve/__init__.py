"""The HTTP service: ``visrec serve --config serve.yaml`` (``visrec.serve.app``)."""
