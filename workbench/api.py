"""``Workbench``: the Python API, a small facade over the services the CLI and the pages use.

    from workbench import Workbench, Predictor
    wb = Workbench()                                   # WORKBENCH_DATA_DIR, or data_dir=...
    ds = wb.add_dataset("leaves/", name="leaves")      # folder (one sub-folder per class) or zip
    run = wb.train("leaves", variant="lite0")          # blocks, with a progress bar; wait=False: a handle
    bundle = wb.export(run)                            # the verified bundle's path
    Predictor.load(bundle).predict(["new_leaf.jpg"])

Nothing here is a second implementation: each method calls the service the CLI command of the
same name calls (``workbench data add`` -> ``datasets.add_dataset``, ``workbench train`` ->
``runs.queue_training`` + the train lane's worker, ``workbench evaluate`` / ``export`` ->
``evaluations.evaluate_run`` / ``exports.export_run``, ``workbench recommend`` ->
``recommend.recommend_obj`` with the Recommend page's budget from ``views.recommend_budget``).
Errors are the services' own (``ValueError`` family with a plain message).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench import datasets, follow, runs, views
from workbench.datasets import DatasetInfo, DeleteResult
from workbench.predictor import Predictor
from workbench.runs import RunInfo, progress_text
from workbench.search_clock import DEFAULT_TIME_BUDGET_MIN
from workbench.settings import Settings, get_settings
from workbench.status import RunStatus

if TYPE_CHECKING:  # evaluations and exports import torch: loaded when first used, not on import
    from core.recommend import Recommendation
    from workbench.evaluations import EvaluationResult
    from workbench.searches import SearchInfo

POLL_S = follow.POLL_S


class RunFailed(RuntimeError):
    """A training run ended without succeeding; ``info`` is its final state."""

    def __init__(self, info: RunInfo) -> None:
        super().__init__(f"run {info.id} {info.status}" + (f": {info.error}" if info.error else ""))
        self.info = info


@dataclass(frozen=True)
class RunHandle:
    """A queued or finished training run. ``wait()`` blocks until it ends; ``info()`` reads its state."""

    id: int
    workbench: Workbench = field(repr=False, compare=False)

    def info(self) -> RunInfo:
        return runs.get_run(self.id, settings=self.workbench.settings)

    @property
    def status(self) -> str:
        return self.info().status

    def wait(self, *, progress: bool = True, poll_s: float = POLL_S) -> RunInfo:
        """Block until the run ends (a tqdm bar in terminals and notebooks); RunFailed unless it succeeded."""
        info = self.workbench._follow(self.id, progress=progress, poll_s=poll_s)
        if info.status != RunStatus.SUCCEEDED:
            raise RunFailed(info)
        return info

    def cancel(self) -> str:
        return runs.cancel_run(self.id, settings=self.workbench.settings)


RunRef = int | RunHandle | RunInfo


def _run_id(run: RunRef) -> int:
    if isinstance(run, RunHandle | RunInfo):
        return run.id
    if isinstance(run, bool) or not isinstance(run, int):
        raise TypeError(f"a run is a run id (int), a RunHandle or a RunInfo, got {type(run).__name__}")
    return run


class Workbench:
    """One Workbench installation: its data folder and database.

    ``data_dir``: default ``WORKBENCH_DATA_DIR`` (else ./workbench-data). ``database_url``: default
    ``DATABASE_URL`` when no ``data_dir`` is given, else SQLite inside ``data_dir``."""

    def __init__(self, data_dir: str | Path | None = None, database_url: str | None = None) -> None:
        base = get_settings()
        if data_dir is not None:
            root = Path(data_dir).expanduser().resolve()
            base = replace(base, data_dir=root, database_url=database_url or f"sqlite:///{root / 'workbench.db'}")
        elif database_url is not None:
            base = replace(base, database_url=database_url)
        self.settings: Settings = base
        self.settings.ensure_dirs()

    def __repr__(self) -> str:
        return f"Workbench(data_dir={str(self.settings.data_dir)!r})"

    # --- datasets ---------------------------------------------------------------------------
    def add_dataset(self, path: str | Path, name: str | None = None, *, csv: str | Path | None = None,
                    group_regex: str | None = None, seed: int = 0, progress: bool = True) -> DatasetInfo:
        """Ingest a folder (one sub-folder per class), a zip of one, or a CSV manifest; blocks until done.

        ``name`` defaults to the folder's or zip's name. Returns the dataset with its health report."""
        from tqdm.auto import tqdm

        source = Path(path).expanduser()
        name = name or source.stem
        bar: Any = None

        def step(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="img", desc=f"adding {name}", disable=not progress)
            bar.update(done - bar.n)

        try:
            return datasets.add_dataset(source, name, csv=csv, group_regex=group_regex, seed=seed,
                                        progress=step, settings=self.settings)
        finally:
            if bar is not None:
                bar.close()

    def datasets(self) -> list[DatasetInfo]:
        return datasets.list_datasets(settings=self.settings)

    def report(self, dataset: str | int) -> DatasetInfo:
        """The dataset's health report: class and split counts, sizes, duplicates, warnings, skipped files
        (``.health``, ``.split_config``, ``.skipped``), as ``workbench data report`` shows it."""
        return datasets.get_dataset(dataset, settings=self.settings)

    def delete_dataset(self, dataset: str | int) -> DeleteResult:
        return datasets.delete_dataset(dataset, settings=self.settings)

    # --- recommend --------------------------------------------------------------------------
    def recommend(self, dataset: str | int | None = None, *, device: str = "this-machine",
                  latency_ms: float | None = None, latency_p95_ms: float | None = None,
                  memory_mb: float | None = None, size_mb: float | None = None, precision: str = "fp32",
                  max_params_m: float | None = None, min_resolution: int | None = None,
                  measure: bool = False, check_hub: bool = True) -> Recommendation:
        """Which variant x resolution fits a device budget (``None``: no limit). With a dataset, its
        classes and training images count, as on the Recommend page. ``.ranked[0]`` is the pick."""
        from workbench.recommend import recommend_obj

        info = self.report(dataset) if dataset is not None else None
        budget = views.recommend_budget(device=device, latency_ms=latency_ms or 0, latency_p95_ms=latency_p95_ms or 0,
                                        memory_mb=memory_mb or 0, size_mb=size_mb or 0, precision=precision,
                                        max_params_m=max_params_m or 0, min_resolution=min_resolution or 0,
                                        dataset=info)
        return recommend_obj(budget, measure=measure, check_hub=check_hub,
                             database_url=self.settings.database_url)

    # --- training ---------------------------------------------------------------------------
    def train(self, dataset: str | int, variant: str | None = None, recipe: str = "default", *,
              resolution: int | None = None, preset: str | None = None, epochs: int | None = None,
              overrides: dict[str, Any] | None = None, wait: bool = True, progress: bool = True) -> RunHandle:
        """Fine-tune ``variant`` (default lite0) on a dataset in the background worker, then export,
        verify and evaluate it, as ``workbench train`` does. ``wait=True`` (default) blocks with a
        progress bar and raises RunFailed if the run does not succeed; ``wait=False`` returns at once."""
        (run_id,) = runs.queue_training(dataset, [variant or "lite0"], resolution=resolution, preset=preset,
                                        recipe=recipe, epochs=epochs, overrides=overrides, settings=self.settings)
        handle = RunHandle(run_id, self)
        if wait:
            handle.wait(progress=progress)
        return handle

    def auto(self, dataset: str | int, *, device: str = "this-machine", latency_ms: float | None = None,
             memory_mb: float | None = None, size_mb: float | None = None, precision: str = "fp32",
             time: str | float = DEFAULT_TIME_BUDGET_MIN, objective: str = "macro-f1",
             max_trials: int | None = None, seed: int = 0, wait: bool = True, progress: bool = True) -> SearchInfo:
        """Search models and recipes on the data within a device budget and a time budget, as
        ``workbench auto`` does; the winner is tested and bundled (``Predictor.from_run(info.winner_run_id)``).
        ``wait=True`` blocks with a progress bar on the time budget."""
        from workbench import searches

        info = searches.start_search(dataset, device=device, latency_ms=latency_ms, memory_mb=memory_mb,
                                     size_mb=size_mb, precision=precision, time_budget=time, objective=objective,
                                     max_trials=max_trials, seed=seed, settings=self.settings)
        return self._follow_search(info.id, progress=progress) if wait else info

    def _follow_search(self, search_id: int, *, progress: bool, poll_s: float = POLL_S) -> SearchInfo:
        from tqdm.auto import tqdm

        from workbench import search_words, searches

        info = searches.get_search(search_id, settings=self.settings)
        bar = tqdm(total=int(info.time_budget_s), unit="s", desc=f"search {search_id}", disable=not progress)

        def show(info: SearchInfo) -> None:
            bar.n = int(min(info.spent_s, info.time_budget_s))
            bar.set_postfix_str(search_words.progress_line(info)[:80], refresh=True)

        try:
            return follow.follow_search(search_id, settings=self.settings, on_update=show, poll_s=poll_s)
        finally:
            bar.close()

    def run(self, run_id: int) -> RunHandle:
        self.run_info(run_id)  # RunError for an unknown id, now rather than later
        return RunHandle(run_id, self)

    def run_info(self, run: RunRef) -> RunInfo:
        return runs.get_run(_run_id(run), settings=self.settings)

    def runs(self, dataset: str | int | None = None) -> list[RunInfo]:
        from workbench import worker  # the handlers it knows import torch

        worker.reconcile(settings=self.settings)
        return runs.list_runs(dataset, settings=self.settings)

    def _follow(self, run_id: int, *, progress: bool, poll_s: float) -> RunInfo:
        """The run's progress (the job's snapshot in the database) in a tqdm.auto bar, as
        ``workbench train`` shows it in a terminal (``workbench.follow``: one loop for all)."""
        from tqdm.auto import tqdm

        info = runs.get_run(run_id, settings=self.settings)
        bar = tqdm(total=1000, desc=f"run {run_id} {info.variant}", disable=not progress,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

        def show(info: RunInfo) -> None:
            bar.n = int(1000 * min(1.0, float((info.progress or {}).get("fraction") or 0.0)))
            bar.set_postfix_str(progress_text(info), refresh=True)

        try:
            return follow.follow_run(run_id, settings=self.settings, on_update=show, poll_s=poll_s)
        finally:
            bar.close()

    # --- evaluate and export ----------------------------------------------------------------
    def evaluate(self, run: RunRef, *, tta: bool = False, sensitivity: float = 0.95,
                 positive_class: str | None = None) -> EvaluationResult:
        """Evaluate on the held-out test split (metrics, calibration, two-class threshold); in-process."""
        from workbench import evaluations

        return evaluations.evaluate_run(_run_id(run), tta=tta, sensitivity=sensitivity,
                                        positive_class=positive_class, settings=self.settings)

    def export(self, run: RunRef, *, fp16: bool = False, int8: bool = False, uint8: bool = False,
               output: str | Path | None = None) -> Path:
        """Build the verified deploy bundle (zip) and return its path (``output`` if given)."""
        from workbench import exports

        out = exports.export_run(_run_id(run), fp16=fp16, int8=int8, uint8_graph=uint8, out_path=output,
                                 settings=self.settings)
        return Path(out.out_path or out.bundle_path)

    def predictor(self, run: RunRef, *, device: str | None = None) -> Predictor:
        """A Predictor on the run's newest verified bundle (export it first), with ONNX Runtime on
        ``device`` (auto, cpu, cuda, cuda:N; default WORKBENCH_DEVICE); ``.runs_on`` says where."""
        return Predictor.from_run(_run_id(run), settings=self.settings, device=device)


__all__ = ["RunFailed", "RunHandle", "Workbench"]
