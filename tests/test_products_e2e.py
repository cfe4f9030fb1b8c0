"""End to end on CPU: synthetic products -> fine-tune a descriptor -> mAP@7 on held-out in-the-wild queries."""

import pytest
import torch

from visrec.models import build_backbone
from visrec.models.inference import evaluate_descriptor
from visrec.train.checkpoint import load_backbone


@pytest.mark.slow
def test_finetuning_raises_map_at_7_well_above_the_untrained_descriptor(trained_products):
    root, run, result, cfg = trained_products  # configs/products/synthetic.yaml trained as shipped (conftest)
    torch.manual_seed(0)
    untrained = evaluate_descriptor(build_backbone(cfg.model.name, **cfg.model.kwargs), root, cfg.data["size"])
    trained = evaluate_descriptor(load_backbone(run)[0], root, cfg.data["size"])
    print(f"mAP@7 (hits form) on held-out queries: untrained {untrained['map@7_hits']:.4f}, "
          f"fine-tuned {trained['map@7_hits']:.4f}; min_gt form {untrained['map@7_min_gt']:.4f} -> "
          f"{trained['map@7_min_gt']:.4f}")
    assert result.metrics["val/map@7_hits"] == pytest.approx(trained["map@7_hits"])
    assert trained["map@7_hits"] > 0.3 and trained["map@7_hits"] > 3 * untrained["map@7_hits"]
    assert trained["map@7_min_gt"] > 3 * untrained["map@7_min_gt"]
