"""visrec: lightweight face recognition, 106-point landmarks and beauty-product retrieval.

One path from data to service: data -> models -> train -> budget -> evaluate -> export ->
index -> serve.  See docs/design.md for the layout and docs/metrics.md for metric definitions.
"""

__version__ = "0.1.0"
