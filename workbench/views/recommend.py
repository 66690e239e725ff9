"""What the Recommend page (and the API) hand the recommender: the budget from the form."""
from __future__ import annotations

from typing import Any

from workbench.datasets import DatasetInfo
from workbench.views.datasets import health_view


def recommend_budget(*, device: str, latency_ms: float = 0, latency_p95_ms: float = 0, memory_mb: float = 0,
                     size_mb: float = 0, precision: str = "fp32", max_params_m: float = 0, min_resolution: int = 0,
                     dataset: DatasetInfo | None = None) -> dict[str, Any]:
    """The recommender's budget from the form (0: no limit); a dataset adds its classes and training
    images (small data favours small models), without one candidates are ranked as for ImageNet."""
    health = health_view(dataset) if dataset else None
    return {
        "device": device, "latency_ms": latency_ms or None, "latency_p95_ms": latency_p95_ms or None,
        "memory_mb": memory_mb or None, "size_mb": size_mb or None, "precision": precision,
        "max_params_m": max_params_m or None, "min_resolution": int(min_resolution) or None,
        "train_images": (health.train_images if health else 0) or None,
        # The images' own size caps the resolution (no 260 px proposals for 100 px crops).
        "max_resolution": health.max_resolution if health else None,
        "num_classes": dataset.num_classes if dataset and dataset.num_classes else 1000,
    }
