"""What an Auto search is over, fixed once when it is queued: its ``SearchPlan``.

The architecture space, the split counts and the class imbalance are worked out by
``plan_search`` at queue time (``searches.start_search``) and stored on the row
(``Search.plan``); every worker of every sitting reads that one plan. Recomputing it in the
worker could give another space (weights reachable now, a changed device profile), and the
Optuna study's choices must stay the same for the whole search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.recommend import Budget, BudgetError
from core.search import ArchChoice, ArchSpace, SearchError, architecture_space
from storage import repositories as repo
from storage.models import Dataset, Image, Search
from workbench.runs import default_preset

MIN_TRAIN_PER_CLASS = 2
MIN_VAL_IMAGES = 2


class SearchRequestError(ValueError):
    """A request about searches cannot be honoured; the message says why."""


@dataclass(frozen=True)
class SearchPlan:
    space: ArchSpace  # the (variant, resolution) choices the study samples from
    num_train: int
    num_val: int
    num_test: int  # the finish's reserve of time grows with it (the finalists are tested on it)
    imbalance_ratio: float  # largest over smallest training class (imbalance handling is searched from 1.5)
    preset: str  # the augmentation of the starting point (the kind of image)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.space.to_dict(), "num_train": self.num_train, "num_val": self.num_val,
                "num_test": self.num_test, "imbalance_ratio": self.imbalance_ratio, "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchPlan:
        sp = d["space"]
        space = ArchSpace(tuple(ArchChoice(**c) for c in sp["choices"]), int(sp["data_cap"]), str(sp["device"]),
                          tuple(sp.get("notes", ())))
        return cls(space, int(d["num_train"]), int(d["num_val"]), int(d["num_test"]), float(d["imbalance_ratio"]),
                   str(d["preset"]))

    @property
    def fastest_ms(self) -> float:
        """The lowest predicted latency among the choices (for time estimates)."""
        return min(c.latency_p50_ms for c in self.space.choices)


def stored_plan(row: Search) -> SearchPlan | None:
    """The plan stored when the search was queued (None: queued before plans were stored)."""
    return SearchPlan.from_dict(row.plan) if row.plan else None


def check_splits(s: Session, ds: Dataset) -> tuple[int, int, int]:
    """(train, validation, test) images; SearchRequestError when the dataset is too small to search."""
    counts = repo.split_counts(s, ds.id)
    if len(ds.classes) < 2:
        raise SearchRequestError(f"Dataset {ds.name!r} has {len(ds.classes)} class(es); a search needs at least 2.")
    train = counts.get("train", {})
    few = [c for c in ds.classes if train.get(c, 0) < MIN_TRAIN_PER_CLASS]
    if few:
        raise SearchRequestError(f"Dataset {ds.name!r} is too small to search: class '{few[0]}' has "
                                 f"{train.get(few[0], 0)} training image(s); each class needs at least "
                                 f"{MIN_TRAIN_PER_CLASS} for training plus some for validation.")
    num_val = sum(counts.get("val", {}).values())
    if num_val < MIN_VAL_IMAGES:
        raise SearchRequestError(f"Dataset {ds.name!r} has no validation images: trials are compared on "
                                 "validation only, so re-split it with a validation part first.")
    return sum(train.values()), num_val, sum(counts.get("test", {}).values())


def image_sizes(s: Session, dataset_id: int) -> list[tuple[int, int]]:
    rows = s.execute(select(Image.width, Image.height).where(Image.dataset_id == dataset_id,
                                                             Image.split.in_(("train", "val"))))
    return [(int(w), int(h)) for w, h in rows]


def train_imbalance(s: Session, dataset_id: int) -> float:
    """Largest over smallest class count of the training split (1.0 for balanced classes)."""
    counts = repo.split_counts(s, dataset_id).get("train", {})
    return max(counts.values(), default=1) / max(1, min(counts.values(), default=1))


def plan_search(s: Session, ds: Dataset, budget: Budget) -> tuple[Budget, SearchPlan]:
    """The budget completed with the data's size, and the plan; SearchRequestError says why there is none."""
    num_train, num_val, num_test = check_splits(s, ds)
    try:
        budget = Budget(**{**budget.to_dict(), "train_images": num_train, "num_classes": len(ds.classes)})
        space = architecture_space(budget, image_sizes(s, ds.id))
    except (SearchError, BudgetError, ValueError) as exc:  # ValueError: an unknown device profile
        raise SearchRequestError(str(exc)) from exc
    return budget, SearchPlan(space, num_train, num_val, num_test, train_imbalance(s, ds.id),
                              default_preset(s, ds.id))
