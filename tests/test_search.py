"""The Auto search: its space (budget, weights, image sizes), its objective, the shared feature
cache, every bad input, and real searches through the CLI and the worker: trials are runs, the
test split is touched by the finalists only, a killed search resumes, two searches queue."""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
from pathlib import Path

import pytest
from builders import write_images

from core.recommend import Budget
from core.search import (
    Objective,
    SearchError,
    TrialPoint,
    architecture_space,
    choose_finalists,
    data_resolution_cap,
    pareto_front,
    search_resolutions,
    validation_noise,
)
from core.train import FeatureStore, make_config, train
from tests.conftest import stop_workers, wait_for, worker_processes

MED_CLASSES = ("AbdomenCT", "CXR", "Hand")


# ---------------------------------------------------------------------------------------------
# The space, the objective, selection (pure)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, cap", [([(105, 100)] * 5, 128), ([(64, 64)] * 3, 96), ([(500, 375)] * 4, 384),
                                        ([(28, 28), (30, 30), (2000, 1500)], 96)])
def test_data_resolution_cap_follows_the_median_shorter_side(sizes, cap) -> None:
    assert data_resolution_cap(sizes) == cap


@pytest.mark.parametrize("native, cap, expected", [
    (224, 512, [224, 192, 160, 128]),  # down to half the native size
    (260, 512, [260, 224, 192, 160]),  # 256 is within 16 px of 260: the same model in practice
    (224, 128, [128]),  # 100 px images: never start at 224
    (224, 96, [96]),  # tiny images: below half the native size, not below 96
])
def test_search_resolutions_from_native_down_to_what_the_data_supports(native, cap, expected) -> None:
    assert search_resolutions(native, cap) == expected


def test_space_has_only_models_with_weights_that_fit_at_supported_sizes() -> None:
    space = architecture_space(Budget(device="this-machine"), [(100, 100)] * 5)
    assert space.choices and all(c.resolution <= 128 for c in space.choices)
    assert {c.variant for c in space.choices} <= {"lite0", "lite1", "lite2"}  # the offline weights
    no_lite2 = architecture_space(Budget(device="this-machine"), [(100, 100)] * 5,
                                  weights={"lite0": True, "lite1": True, "lite2": False, "b0": False})
    assert "lite2" not in {c.variant for c in no_lite2.choices}


@pytest.mark.parametrize("budget, words", [
    (Budget(device="rpi4", latency_ms=1), ["latency limit", "Closest: lite0@"]),
    (Budget(device="this-machine", size_mb=1), ["file-size limit", "Closest"]),
])
def test_a_budget_nothing_fits_names_the_limit_and_the_nearest_model(budget, words) -> None:
    with pytest.raises(SearchError) as err:
        architecture_space(budget, [(500, 500)] * 4)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_no_reachable_weights_is_refused_not_trained_from_scratch() -> None:
    with pytest.raises(SearchError, match="No pretrained weights"):
        architecture_space(Budget(), [(224, 224)], weights={"lite0": False, "b0": False})


@pytest.mark.parametrize("text, metric, spec", [("macro-f1", "macro_f1", 0.95), (None, "macro_f1", 0.95),
                                                ("sensitivity@spec0.9", "sensitivity_at_specificity", 0.9)])
def test_objective_parses(text, metric, spec) -> None:
    o = Objective.parse(text)
    assert (o.metric, o.target_specificity) == (metric, spec)
    assert Objective.parse(o.text) == o


@pytest.mark.parametrize("text", ["accuracy", "sensitivity@spec", "sensitivity@spec1.5", "sensitivity@specabc"])
def test_bad_objectives_are_refused(text) -> None:
    with pytest.raises(SearchError):
        Objective.parse(text)


def test_pareto_front_and_finalists() -> None:
    pts = [TrialPoint(1, 0.90, 10.0), TrialPoint(2, 0.95, 30.0), TrialPoint(3, 0.85, 12.0),
           TrialPoint(4, 0.97, 80.0), TrialPoint(5, 0.97, 60.0)]
    assert [p.key for p in pareto_front(pts)] == [1, 2, 5]
    winner, finalists = choose_finalists(pts, n=3)
    assert winner is not None and winner.key == 5  # best validation, the faster of the tie
    assert [p.key for p in finalists] == [5, 1, 2]
    assert choose_finalists([]) == (None, [])


@pytest.mark.parametrize("score, images, expected", [
    (0.9, 100, ((91 / 102) * (11 / 102) / 100) ** 0.5),  # one success and one failure added
    (1.0, 450, ((451 / 452) * (1 / 452) / 450) ** 0.5),  # a perfect score still has some noise
    (0.0, 40, ((1 / 42) * (41 / 42) / 40) ** 0.5),
    (0.9, 0, None), (1.2, 50, None), (float("nan"), 50, None),
])
def test_validation_noise_is_one_standard_error_on_that_many_images(score, images, expected) -> None:
    assert validation_noise(score, images) == (pytest.approx(expected) if expected is not None else None)
    if expected is not None and images < 400:  # fewer images, more noise
        assert validation_noise(score, images) > validation_noise(score, images * 4)  # type: ignore[operator]


@pytest.mark.parametrize("winner_run, start, winner, noise, words, flagged", [
    (7, 0.95, 0.95, 0.015, ["winner is the first trial", "206 validation images"], False),
    (9, 0.95, 0.95, 0.015, ["the same as plain training", "run 7", "faster"], False),
    (9, 0.967, 0.980, 0.0144, ["1.3 points above plain training", "run 7", "±1.4 points", "may be no better"], True),
    (9, 0.903, 0.953, 0.0456, ["5.0 points above", "more than the ±4.6 points"], False),
    (9, 0.9500, 0.9501, 0.015, ["less than 0.1 point above", "may be no better"], True),
    (9, 0.90, 0.95, None, ["5.0 points above plain training"], False),
])
def test_the_winner_is_set_against_plain_training_in_plain_words(winner_run, start, winner, noise, words,
                                                                 flagged) -> None:
    from workbench.searches import StartComparison

    cmp = StartComparison.from_summary({"winner_run_id": winner_run, "versus_start": {
        "run_id": 7, "value": start, "winner_value": winner, "images": 206, "noise": noise}})
    assert cmp is not None and cmp.within_noise is flagged
    text = cmp.sentence()
    for w in words:
        assert w in text, (w, text)
    assert StartComparison.from_summary({"winner_run_id": 3}) is None  # a search finished before this existed


@pytest.mark.parametrize("budget_s, imbalance", [(600.0, 1.0), (600.0, 4.0), (120.0, 1.0)])
def test_the_starting_point_trains_as_workbench_train_does_and_keeps_that_when_rerun(budget_s, imbalance) -> None:
    """Trial 0 is the configuration `workbench train --recipe default` queues for the same seed and
    preset (at full length unless the whole budget is short), also when a killed trial 0 is re-run."""
    import optuna

    from core.search import (
        HEAD_EPOCHS,
        SHORT_BUDGET_S,
        fail_stale_trials,
        starting_point,
        suggest_trial,
        trial_epochs,
    )

    space = architecture_space(Budget(device="this-machine"), [(500, 500)] * 5)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(starting_point(space, "field", imbalance), user_attrs={"starting_point": True})
    epochs = trial_epochs(budget_s)
    plans = [suggest_trial(study.ask(), space, Objective.parse("macro-f1"), imbalance_ratio=imbalance, seed=3,
                           epochs=epochs)]
    fail_stale_trials(study, lambda t: False)  # the worker died during trial 0
    plans.append(suggest_trial(study.ask(), space, Objective.parse("macro-f1"), imbalance_ratio=imbalance, seed=3,
                               epochs=epochs))
    assert study.trials[1].user_attrs["rerun_of"] == 0
    as_train = dataclasses.asdict(make_config("default", augment="field", seed=3))
    for plan in plans:
        got = dataclasses.asdict(plan.config)
        # "auto" balance means a class-weighted loss from 3:1 imbalance on: the same choice, made early.
        assert got.pop("balance") == ("loss" if imbalance >= as_train["imbalance_ratio"] else "none")
        differ = {k: (v, as_train[k]) for k, v in got.items() if v != as_train[k]}
        if budget_s < SHORT_BUDGET_S:  # a short budget shortens every trial, the starting point too
            assert plan.config.head_epochs < HEAD_EPOCHS and set(differ) <= {"head_epochs", "finetune_epochs",
                                                                             "patience"}
        else:
            assert differ == {}, differ
    assert plans[0].config == plans[1].config


# ---------------------------------------------------------------------------------------------
# The search's state: its summary's schema, its clock, its default budget
# ---------------------------------------------------------------------------------------------
def test_a_search_summary_takes_only_the_keys_of_its_schema() -> None:
    from storage.models import Search
    from workbench.summary import merge_search_summary

    row = Search(summary={"winner_run_id": 3})
    merge_search_summary(row, {"finalize_seconds": 12.5})
    assert row.summary == {"winner_run_id": 3, "finalize_seconds": 12.5}
    # The sitting's clock is coordination state: a column, never a summary key again.
    with pytest.raises(ValueError, match="'sitting_started' is not a field of a search's summary"):
        merge_search_summary(row, {"sitting_started": 1.0, "finalize_seconds": 1.0})  # type: ignore[typeddict-unknown-key]
    assert row.summary == {"winner_run_id": 3, "finalize_seconds": 12.5}  # nothing of a refused write is kept


def test_the_sitting_clock_gives_time_spent_time_left_and_the_trials_deadline() -> None:
    from datetime import timedelta

    from storage.models import Search, utcnow
    from workbench.search_clock import SearchClock, close_sitting, open_sitting
    from workbench.status import SearchStatus

    row = Search(status=SearchStatus.RUNNING, time_budget_s=600.0, spent_s=100.0)
    with pytest.raises(ValueError, match="no running sitting"):
        SearchClock.of(row).trial_deadline()
    clock = open_sitting(row, lambda left: left / 10)  # the first worker: starts the clock, keeps 50 s back
    assert row.sitting_started_at is not None and row.reserve_s == 50.0
    start = row.sitting_started_at
    assert clock.trial_deadline() == pytest.approx(start.timestamp() + 500.0 - 50.0)
    later = start + timedelta(seconds=30)
    assert (clock.spent_s(later), clock.left_s(later)) == (130.0, 470.0)
    assert clock.left_s(start + timedelta(hours=1)) == 0.0  # never below zero
    joined = open_sitting(row, lambda left: 999.0)  # a second worker of the sitting shares its clock
    assert joined == clock and row.reserve_s == 50.0
    row.sitting_started_at = utcnow() - timedelta(seconds=40)
    close_sitting(row, SearchStatus.FAILED, "stopped")
    assert row.spent_s == pytest.approx(140.0, abs=2.0) and (row.sitting_started_at, row.reserve_s) == (None, None)
    assert SearchClock.of(row).spent_s() == row.spent_s  # a closed sitting no longer counts


def test_the_default_time_budget_is_one_constant_for_every_front_end() -> None:
    import inspect

    from workbench import searches
    from workbench.api import Workbench
    from workbench.search_clock import DEFAULT_TIME_BUDGET_MIN

    assert searches.parse_duration(DEFAULT_TIME_BUDGET_MIN) == 600.0
    assert inspect.signature(Workbench.auto).parameters["time"].default == DEFAULT_TIME_BUDGET_MIN
    assert inspect.signature(searches.start_search).parameters["time_budget"].default == DEFAULT_TIME_BUDGET_MIN


# ---------------------------------------------------------------------------------------------
# The shared feature cache: reused, and the result does not change
# ---------------------------------------------------------------------------------------------
def test_trials_sharing_variant_and_views_reuse_the_cache_with_identical_results(tmp_path: Path) -> None:
    samples = write_images(tmp_path / "imgs", [8, 8])
    val, train_s = samples[:2] + samples[8:10], samples[2:8] + samples[10:]
    cfg = make_config("quick", head_epochs=2, finetune_epochs=1, unfreeze_stages=1, cache_views=2, batch_size=4,
                      head_batch_size=8, num_threads=2)
    store = FeatureStore()
    first = train(train_s, ["a", "b"], "lite0", tmp_path / "r1", cfg, resolution=64, val_samples=val,
                  feature_store=store)
    fewer_views = dataclasses.replace(cfg, cache_views=1)
    second = train(train_s, ["a", "b"], "lite0", tmp_path / "r2", fewer_views, resolution=64, val_samples=val,
                   feature_store=store)
    assert not first.summary.get("cache_reused") and second.summary["cache_reused"]
    assert store.stats.cache_hits == 1 and store.stats.image_hits == 1
    # With the same views, a stored cache gives the very tensors a fresh one would (views are seeded).
    key = next(iter(store._caches))
    entries = list(store._caches[key][1])
    one_view = store.lookup(key, entries, 1, len(train_s), lambda x, _s, _e: x, entries.index)
    assert one_view is not None and all(len(tr) == len(train_s) for tr, _ in one_view.values())
    # More views than stored: recompute.
    assert store.lookup(key, entries, 3, len(train_s), lambda x, _s, _e: x, entries.index) is None
    third = train(train_s, ["a", "b"], "lite0", tmp_path / "r3", cfg, resolution=64, val_samples=val)
    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if k not in ("epoch_seconds", "images_per_s")} for h in history]
    assert strip(first.history) == strip(third.history)  # the store changes nothing in the result


# ---------------------------------------------------------------------------------------------
# Through the service and the CLI, on real images
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def med(data_dir: Path, shared_datasets: Path, tmp_path: Path) -> str:
    """42 real MedNIST images (64 px, three classes) ingested as dataset 'med'."""
    from workbench import datasets

    src = tmp_path / "med"
    for cls in MED_CLASSES:
        (src / cls).mkdir(parents=True)
        for f in sorted((shared_datasets / "mednist_3k" / cls).iterdir())[:14]:
            shutil.copy(f, src / cls / f.name)
    datasets.add_dataset(src, "med")
    return "med"


def _cli(*args: str) -> int:
    from workbench.cli import main

    return main(list(args))


@pytest.mark.parametrize("args, message", [
    (["nope", "--time", "5m"], "No dataset named 'nope'"),
    (["med", "--time", "5s"], "too short"),
    (["med", "--time", "ten minutes"], "Cannot read the time"),
    (["med", "--device", "rpi4", "--latency-ms", "1"], "the latency limit excludes every model"),
    (["med", "--objective", "sensitivity@spec0.95"], "needs exactly two classes"),
    (["med", "--device", "toaster"], "toaster"),
    (["med", "--latency-ms", "-5"], "latency_ms must be a positive number"),
])
def test_bad_search_requests_say_why_and_queue_nothing(med: str, capsys, args, message) -> None:
    from workbench import searches

    assert _cli("auto", *args) == 2
    assert message in capsys.readouterr().err
    assert searches.list_searches() == []


def test_a_dataset_too_small_to_split_is_refused(data_dir: Path, shared_datasets: Path, tmp_path: Path,
                                                 capsys) -> None:
    from workbench import datasets

    src = tmp_path / "tiny"
    for cls in MED_CLASSES[:2]:
        (src / cls).mkdir(parents=True)
        for f in sorted((shared_datasets / "mednist_3k" / cls).iterdir())[:2]:
            shutil.copy(f, src / cls / f.name)
    datasets.add_dataset(src, "tiny")
    assert _cli("auto", "tiny", "--time", "5m") == 2
    err = capsys.readouterr().err
    assert "too small to search" in err or "no validation images" in err, err


def test_the_plan_is_made_once_at_queue_time_and_the_worker_reads_the_stored_one(med: str) -> None:
    from storage.db import get_sessionmaker
    from storage.models import Search
    from workbench import searches
    from workbench.handlers.search import SearchSetup, begin_sitting
    from workbench.jobs import JobContext
    from workbench.search_plan import SearchPlan, check_splits, stored_plan, train_imbalance
    from workbench.settings import get_settings
    from workbench.status import JobKind, SearchStatus

    info = searches.start_search(med, time_budget="5m", start_worker=False)
    settings = get_settings()
    sf = get_sessionmaker(settings.database_url)
    with sf.begin() as s:
        row = s.get(Search, info.id)
        assert row is not None
        plan = stored_plan(row)
        assert plan is not None and plan == info.plan and plan.space.choices
        assert (plan.num_train, plan.num_val, plan.num_test) == check_splits(s, row.dataset)
        assert plan.imbalance_ratio == train_imbalance(s, row.dataset_id)
        assert row.summary == {} and row.sitting_started_at is None
        # Change the stored plan: a worker that recomputed it would not see this.
        changed = dataclasses.replace(plan, imbalance_ratio=9.0, space=dataclasses.replace(
            plan.space, choices=plan.space.choices[-1:]))
        row.plan = changed.to_dict()
        job_id = searches.search_jobs(s, info.id)[0].id
    assert SearchPlan.from_dict(changed.to_dict()) == changed

    ctx = JobContext(job_id=job_id, kind=JobKind.SEARCH, run_id=None, payload={"search_id": info.id},
                     session_factory=sf, settings=settings)
    setup = begin_sitting(ctx, info.id)
    assert isinstance(setup, SearchSetup)
    assert setup.plan == changed and setup.rules.space == changed.space and setup.data.imbalance_ratio == 9.0
    assert len(setup.data.samples) == changed.num_train and len(setup.data.val) == changed.num_val
    with sf() as s:
        row = s.get(Search, info.id)
        assert row is not None and row.status == SearchStatus.RUNNING
        assert row.sitting_started_at is not None and row.reserve_s is not None and row.summary == {}
        assert setup.rules.deadline == pytest.approx(row.sitting_started_at.timestamp() + 300.0 - row.reserve_s)
    again = begin_sitting(ctx, info.id)  # a second worker joins the sitting: the same plan and deadline
    assert isinstance(again, SearchSetup) and again.rules == setup.rules and again.plan == changed
    assert 0.0 <= searches.get_search(info.id).spent_s < 60.0


@pytest.mark.slow
def test_two_searches_queue_on_one_worker_and_each_delivers_a_tested_winner_and_a_bundle(med: str, data_dir: Path,
                                                                                           capsys) -> None:
    from sqlalchemy import select

    from core.bundle import open_bundle
    from storage.db import get_sessionmaker
    from storage.models import Evaluation, Run
    from workbench import searches
    from workbench.artifacts import artifact_for_download
    from workbench.settings import get_settings
    from workbench.status import RunStatus, SearchStatus

    first = searches.start_search(med, time_budget="4m", max_trials=2, size_mb=15)  # lite0 only: quick trials
    second = searches.start_search(med, time_budget="4m", max_trials=1, size_mb=15, seed=1)
    try:
        for sid in (first.id, second.id):
            wait_for(lambda sid=sid: not searches.get_search(sid).active, timeout=600, poll=1.0,
                     what=f"search {sid} to end")
    finally:
        stop_workers(data_dir)
    a, b = searches.get_search(first.id), searches.get_search(second.id)
    assert (a.status, b.status) == (SearchStatus.SUCCEEDED, SearchStatus.SUCCEEDED), (a.error, b.error)
    assert a.spent_s <= a.time_budget_s + 60  # inside the budget (plus at most one epoch's overrun)
    # At most the 2 trials asked for (fewer if the first used the time), lite0 only (the size limit).
    assert 1 <= len(a.trials) <= 2 and all(t.model.startswith("lite0@") for t in a.trials)
    winner = next(t for t in a.trials if t.winner)
    assert winner.run_id == a.winner_run_id and winner.test_accuracy is not None
    assert a.summary["winner_latency"]["source"].startswith("measured on this machine")
    assert set(a.summary["pareto"]) <= {t.run_id for t in a.trials}
    # Honest selection: only finalists were ever evaluated on the test split.
    sf = get_sessionmaker(get_settings().database_url)
    with sf() as s:
        evaluated = set(s.scalars(select(Evaluation.run_id)))
        statuses = {r.id: r.status for r in s.scalars(select(Run).where(Run.search_id == first.id))}
    assert evaluated & set(statuses) == set(a.summary["finalists"])
    assert all(st in (RunStatus.SUCCEEDED, RunStatus.PRUNED) for st in statuses.values())
    # The first trial is the default: the recommender's pick with the default recipe.
    import optuna

    from core.train import RECIPES
    study = optuna.load_study(study_name=f"workbench-search-{first.id:05d}", storage=os.environ.get(
        "DATABASE_URL") or f"sqlite:///{data_dir / 'workbench.db'}")
    start = study.trials[0]
    assert a.plan is not None  # the space stored when the search was queued: its first pick starts
    assert start.user_attrs.get("starting_point") and start.params["model"] == a.plan.space.choices[0].key
    assert (start.params["lr_head"], start.params["unfreeze_stages"]) == (RECIPES["default"]["lr_head"],
                                                                         RECIPES["default"]["unfreeze_stages"])
    bundle = open_bundle(artifact_for_download(a.bundle_artifact_id), key=get_settings().bundle_key)
    assert bundle.labels == list(MED_CLASSES)
    # The winner is set against that first trial, with how far chance moves a score on the validation images.
    from workbench import datasets

    cmp, first_trial = a.versus_start, next(t for t in a.trials if t.number == 0)
    n_val = datasets.get_dataset(med).split_config["counts"]["val"]
    assert cmp is not None and (cmp.start_run_id, cmp.start_value) == (first_trial.run_id, first_trial.value)
    assert cmp.images == n_val and cmp.noise == pytest.approx(validation_noise(cmp.start_value, n_val))
    # The CLI reads it back, and deleting the search deletes its trial runs.
    capsys.readouterr()
    assert _cli("auto", "--follow", str(first.id)) == 0
    assert cmp.sentence() in capsys.readouterr().out
    from builders import assert_clean, open_page

    at = open_page("auto")  # the Auto page shows the same sentence under its winner
    at.session_state["auto_search"] = first.id
    at.run()
    assert_clean(at)
    assert any(cmp.sentence() in m.value for m in [*at.caption, *at.info]), [m.value for m in at.caption]
    from plain_language import plain_language_problems

    assert plain_language_problems(at, allow=MED_CLASSES) == []
    assert set(searches.delete_search(first.id)) == set(statuses)
    with sf() as s:
        assert s.scalars(select(Run).where(Run.id.in_(list(statuses)))).all() == []


@pytest.mark.slow
def test_a_search_whose_worker_is_killed_resumes_and_reruns_the_cut_trial(med: str, data_dir: Path) -> None:
    import optuna

    from workbench import searches, worker
    from workbench.status import SearchStatus

    info = searches.start_search(med, time_budget="5m", max_trials=2, size_mb=15)

    def training() -> bool:
        from workbench import runs

        t = searches.get_search(info.id).trials
        return bool(t) and bool(runs.run_metrics(t[0].run_id))
    try:
        wait_for(training, timeout=300, what="the first trial's first epoch")
        for proc in worker_processes(data_dir):
            os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not worker_processes(data_dir), timeout=30, what="the worker to die")
        worker.reconcile()
        dead = searches.get_search(info.id)
        assert dead.status == SearchStatus.FAILED and dead.resumable and "died" in (dead.error or "")
        assert dead.trials[0].status == "failed"
        searches.resume_search(info.id)
        wait_for(lambda: not searches.get_search(info.id).active, timeout=600, poll=1.0, what="the resumed search")
    finally:
        stop_workers(data_dir)
    done = searches.get_search(info.id)
    assert done.status == SearchStatus.SUCCEEDED, done.error
    study = optuna.load_study(study_name=f"workbench-search-{info.id:05d}", storage=os.environ.get(
        "DATABASE_URL") or f"sqlite:///{data_dir / 'workbench.db'}")
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL  # the trial cut off by the kill is marked...
    rerun = [t for t in study.trials if t.user_attrs.get("rerun_of") == 0]
    assert rerun and rerun[0].params == study.trials[0].params  # ...and its settings were tried again
    # The re-run is the plain-training baseline the winner is set against.
    rerun_run = next(t.run_id for t in done.trials if t.number == rerun[0].number)
    assert done.versus_start is not None and done.versus_start.start_run_id == rerun_run


@pytest.mark.slow
def test_auto_page_refuses_an_impossible_budget_then_starts_and_stops_a_search(med: str, data_dir: Path) -> None:
    from builders import open_page

    from workbench import searches
    from workbench.status import SearchStatus

    at = open_page("auto")
    assert not at.exception and at.title[0].value == "Auto"
    at.selectbox(key="auto_device").set_value("rpi4")
    at.number_input(key="auto_latency").set_value(1.0)
    at.button[0].click().run()
    assert any("Nothing fits" in e.value and "latency limit" in e.value for e in at.error)
    assert searches.list_searches() == []
    at.selectbox(key="auto_device").set_value("this-machine")
    at.number_input(key="auto_latency").set_value(0.0)
    at.slider(key="auto_time").set_value(3)
    at.button[0].click().run()
    try:
        [found] = searches.list_searches()
        assert found.time_budget_s == 180 and found.device == "this-machine"
        assert any(f"Search {found.id}" in m.value for m in at.markdown)
        from plain_language import plain_language_problems

        assert plain_language_problems(at, allow=MED_CLASSES) == []
        stop = next(b for b in at.button if b.label == "Stop")
        stop.click().run()
        wait_for(lambda: not searches.get_search(found.id).active, timeout=120, what="the search to stop")
        stopped = searches.get_search(found.id)
        assert stopped.status == SearchStatus.CANCELLED and stopped.resumable
    finally:
        stop_workers(data_dir)


@pytest.mark.slow
def test_two_workers_on_two_hosts_share_one_search(med: str, data_dir: Path) -> None:
    from builders import spawn_host
    from sqlalchemy import select

    from storage.db import get_sessionmaker
    from storage.models import Run
    from workbench import searches
    from workbench.settings import get_settings
    from workbench.status import SearchStatus

    info = searches.start_search(med, time_budget="4m", max_trials=2, size_mb=15, workers=2, start_worker=False)
    procs = [spawn_host(h) for h in ("host-a", "host-b")]
    try:
        wait_for(lambda: not searches.get_search(info.id).active, timeout=600, poll=1.0, what="the shared search")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        stop_workers(data_dir)
    done = searches.get_search(info.id)
    assert done.status == SearchStatus.SUCCEEDED, done.error
    with get_sessionmaker(get_settings().database_url)() as s:
        trials = s.scalars(select(Run).where(Run.search_id == info.id)).all()
    # Both workers trained trials of the one study, each trial once.
    assert len({r.worker_pid for r in trials}) == 2
    assert len({r.trial_number for r in trials}) == len(trials) >= 2
