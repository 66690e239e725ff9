"""What the Auto page reads from a search's stored summary (``Search.summary``) beyond what
``workbench.searches.SearchInfo`` already types: built in one place, with defaults for older rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.views.common import number, record


@dataclass(frozen=True)
class SearchSummaryView:
    winner_latency_ms: float | None  # the winner's typical time per image on the target device
    winner_latency_source: str  # "measured on this machine after training", "predicted for rpi4", ...


def search_summary(summary: dict[str, Any] | None) -> SearchSummaryView:
    """The one reader of a search's stored summary (the pages pass ``SearchInfo.summary``)."""
    lat = record(record(summary).get("winner_latency"))
    return SearchSummaryView(number(lat.get("p50_ms")), str(lat.get("source") or ""))
