"""What the pages (and the CLI) read: typed read models, no Streamlit.

Queries shaped for one screen, returned as frozen dataclasses, built on a service where one
already computes the thing; stored JSON (health reports, run summaries, metrics, search and export
records) is read into dataclasses here, in one function each, so pages never look up its keys.
What pages ask Workbench to do is ``workbench.actions``; caching is ``workbench.ui``'s business.
One module per noun; ``from workbench import views; views.X`` reaches all of them.
"""
from __future__ import annotations

from workbench.views.common import (
    INGEST_SHOWN_FOR,
    JobView,
    ingest_jobs_to_show,
    job,
    percent_range,
    recent_jobs,
    reconcile_runs,
    value_with_range,
    with_range,
)
from workbench.views.datasets import (
    ClassLook,
    DuplicateFile,
    DuplicateGroup,
    Duplicates,
    HealthView,
    ImageKind,
    ImageSample,
    ImportChoices,
    OverviewCounts,
    Shortcuts,
    Sizes,
    dataset_sample,
    health_view,
    import_choices,
    overview_counts,
    store_paths_for,
)
from workbench.views.evaluations import (
    BundleView,
    Interval,
    MetricsView,
    Verification,
    bundle_view,
    metrics_view,
    per_class_ranges,
    verification_view,
)
from workbench.views.leaderboard import (
    ASCENDING_BY_DEFAULT,
    DEFAULT_SORT,
    LEADERBOARD_SORTS,
    TEST_SORTS,
    CurvePoint,
    LeaderboardRow,
    RunPoint,
    _leaderboard_row,
    count_runs,
    leaderboard_margin,
    model_params,
    pareto_front,
    run_choices,
    run_curves,
    run_points,
    runs_table,
    summary_value,
)
from workbench.views.predictions import Guess, ImageAnswer, PredictionView, prediction_view
from workbench.views.recommend import recommend_budget
from workbench.views.runs import (
    LiveRun,
    SummaryView,
    TrainChoices,
    default_predict_run,
    live_runs,
    newest_dataset_id,
    summary_view,
    train_choices,
)
from workbench.views.searches import SearchSummaryView, search_summary

__all__ = [
    "ASCENDING_BY_DEFAULT", "DEFAULT_SORT", "INGEST_SHOWN_FOR", "LEADERBOARD_SORTS", "BundleView", "ClassLook",
    "CurvePoint", "DuplicateFile", "DuplicateGroup", "Duplicates", "Guess", "HealthView", "ImageAnswer",
    "ImageKind", "ImageSample", "ImportChoices", "Interval", "JobView", "LeaderboardRow", "LiveRun", "MetricsView",
    "OverviewCounts", "PredictionView", "RunPoint", "SearchSummaryView", "Shortcuts", "Sizes", "SummaryView",
    "TEST_SORTS", "TrainChoices", "Verification", "_leaderboard_row", "bundle_view", "count_runs", "dataset_sample",
    "default_predict_run", "health_view", "import_choices", "ingest_jobs_to_show", "job", "leaderboard_margin",
    "live_runs", "metrics_view", "model_params", "newest_dataset_id", "overview_counts", "pareto_front",
    "per_class_ranges", "percent_range", "prediction_view", "recent_jobs", "recommend_budget", "reconcile_runs",
    "run_choices", "run_curves", "run_points", "runs_table", "search_summary", "store_paths_for", "summary_value",
    "summary_view", "train_choices", "value_with_range", "verification_view", "with_range",
]
