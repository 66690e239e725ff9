"""The layer rules, read from the source with ``ast`` (nothing is imported), so CI fails on a breach.

* pages and ``workbench/ui.py`` reach the database only through views and services: they never
  import ``storage`` or ``sqlalchemy``; pages never import ``core`` either;
* the job queue (``workbench/jobs.py``) knows none of its clients;
* ``core`` never imports ``streamlit``, ``storage`` or ``workbench``;
* the modules of ``workbench/`` import each other without cycles (imports inside functions count:
  a lazy import hides a cycle from Python, not from the design);
* no file of ``workbench/`` exceeds ``MAX_LINES``;
* no test module imports another: shared builders live in ``tests/builders.py``;
* model families are reached through ``core.registry`` only: outside the registry and a family's own
  modules, nothing imports ``core.efficientnet*`` or asks ``is_lite``;
* pages read stored records (health reports, run summaries, metrics, job results) through the typed
  views of ``workbench.views``, never by string key;
* status words are spelled only in ``workbench/status.py`` and ``core/status.py``: anywhere else
  in the product a string equal to one of them is a breach (a word shown for a status, the value
  of a dict keyed by status members, is a display word and allowed).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT

MAX_LINES = 450
PAGES = sorted((REPO_ROOT / "pages").glob("*.py"))
WORKBENCH = REPO_ROOT / "workbench"
WORKBENCH_FILES = sorted([*WORKBENCH.glob("*.py"), *WORKBENCH.glob("*/*.py")])
CORE_FILES = sorted((REPO_ROOT / "core").rglob("*.py"))
QUEUE_CLIENTS = ["workbench.runs", "workbench.datasets", "workbench.evaluations", "workbench.exports",
                 "workbench.actions",
                 "workbench.artifacts", "workbench.recommend", "workbench.views", "workbench.ui",
                 "workbench.handlers", "workbench.worker", "workbench.cli"]


@dataclass(frozen=True)
class Import:
    module: str  # "a.b" for both "import a.b" and "from a.b import c"
    names: tuple[str, ...]  # what a "from" import takes from the module (attributes or submodules)
    line: int

    def candidates(self) -> list[str]:
        """Every dotted name this import may load: the module, and each name as a possible submodule."""
        return [self.module, *(f"{self.module}.{n}" for n in self.names)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[Import]:
    """Every import in a file, at module level or inside functions, with relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (Import(alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: climb level - 1 packages from this file's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*anchor, *([module] if module else [])])
            yield Import(module, tuple(a.name for a in node.names if a.name != "*"), node.lineno)


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def breaches(path: Path, forbidden: list[str]) -> list[str]:
    """``file:line imports x`` for every import of a forbidden package (or of one of its modules)."""
    rel = path.relative_to(REPO_ROOT)
    return sorted({f"{rel}:{imp.line} imports {name}" for imp in imports(path) for name in imp.candidates()
                   for pkg in forbidden if is_within(name, pkg)})


@pytest.mark.parametrize("path", PAGES, ids=lambda p: f"pages/{p.name}")
def test_pages_use_views_and_services_only(path: Path) -> None:
    assert not breaches(path, ["storage", "sqlalchemy", "core"])


def test_ui_helpers_do_not_touch_the_database() -> None:
    assert not breaches(WORKBENCH / "ui.py", ["storage", "sqlalchemy"])


def test_the_job_queue_knows_none_of_its_clients() -> None:
    assert not breaches(WORKBENCH / "jobs.py", QUEUE_CLIENTS)


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_core_is_independent_of_ui_storage_and_services(path: Path) -> None:
    assert not breaches(path, ["streamlit", "storage", "workbench"])


# --- model families: reached through the registry only ------------------------------------------------
FAMILY_MODULES = ["core.efficientnet", "core.efficientnet_arch", "core.efficientnet_family",
                  "core.mobilenetv3", "core.mobilenetv3_arch", "core.mobilenetv3_family"]
FAMILY_FILES = {REPO_ROOT / "core" / f"{m.rpartition('.')[2]}.py" for m in FAMILY_MODULES}
REGISTRY_CLIENTS = sorted(p for p in [*CORE_FILES, *WORKBENCH_FILES, *PAGES, *(REPO_ROOT / "bench").glob("*.py")]
                          if p not in FAMILY_FILES and "bundle_template" not in p.parts)


def asks_is_lite(path: Path) -> list[str]:
    """``file:line`` for each use of the name ``is_lite`` (attribute, variable or definition)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        name = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name)
                else node.name if isinstance(node, ast.FunctionDef) else None)
        if name == "is_lite":
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_family_scans_find_a_breach(tmp_path: Path) -> None:
    # The family's own record imports its architecture and asks is_lite: both scans see it.
    assert breaches(REPO_ROOT / "core" / "efficientnet_family.py", FAMILY_MODULES)
    assert asks_is_lite(REPO_ROOT / "core" / "efficientnet_family.py")
    probe = tmp_path / "probe.py"
    probe.write_text("def f(v):\n    return 'same' if v.is_lite else 'symmetric'\n")
    assert asks_is_lite(probe) == ["probe.py:2"]


@pytest.mark.parametrize("path", REGISTRY_CLIENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_model_families_are_reached_through_the_registry(path: Path) -> None:
    assert not breaches(path, FAMILY_MODULES), "ask core.registry instead of importing a family's module"
    assert not asks_is_lite(path), "a family's conventions belong in its ModelFamily record, not an is_lite branch"


def workbench_import_graph() -> dict[str, set[str]]:
    """Module -> the workbench modules it imports (``from workbench import runs``: workbench.runs)."""
    modules = {module_name(p): p for p in WORKBENCH_FILES}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for imp in imports(path):
            for sub in [f"{imp.module}.{n}" for n in imp.names] or [imp.module]:
                # A name that is not a submodule is an attribute of the module it comes from.
                target = sub if sub in modules else imp.module
                if target in modules:
                    targets.add(target)
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    on_path, finished = 1, 2
    state: dict[str, int] = {}
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = on_path
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = finished
            elif state.get(nxt) == on_path:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = on_path
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_workbench_modules_import_each_other_without_cycles() -> None:
    graph = workbench_import_graph()
    assert "workbench.views.runs" in graph and "workbench.runs" in graph["workbench.views.runs"]  # the graph is real
    assert "workbench.views.runs" in graph["workbench.views"]  # the package re-exports its modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("path", WORKBENCH_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_workbench_files_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO_ROOT)} has {lines} lines (at most {MAX_LINES})"


# --- status words -------------------------------------------------------------------------------
STATUS_MODULES = [WORKBENCH / "status.py", REPO_ROOT / "core" / "status.py"]
PRODUCT_FILES = sorted(p for root in ("core", "workbench", "storage", "pages") for p in (REPO_ROOT / root).rglob("*.py")
                       if p not in STATUS_MODULES and "bundle_template" not in p.parts and "migrations" not in p.parts)


def status_enums() -> dict[str, set[str]]:
    """The state enums (classes named ...Status, ...State, ...End, ...Outcome) and their words."""
    enums: dict[str, set[str]] = {}
    for path in STATUS_MODULES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Status", "State", "End", "Outcome")):
                enums[node.name] = {a.value.value for a in node.body if isinstance(a, ast.Assign)
                                    and isinstance(a.value, ast.Constant) and isinstance(a.value.value, str)}
    return enums


def status_literals(path: Path, enums: dict[str, set[str]]) -> list[str]:
    """``file:line 'word'`` for each string constant equal to a status word (docstrings and display
    words, the values of a dict whose keys are status members, excepted)."""
    words = set().union(*enums.values())
    tree = ast.parse(path.read_text(), str(path))
    allowed: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            allowed.add(id(first.value))  # a docstring
        if isinstance(node, ast.Dict):
            allowed |= {id(v) for k, v in zip(node.keys, node.values) if isinstance(k, ast.Attribute)
                        and isinstance(k.value, ast.Name) and k.value.id in enums}
    rel = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name
    return [f"{rel}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in words and id(n) not in allowed]


def test_the_status_scan_finds_a_literal(tmp_path: Path) -> None:
    enums = status_enums()
    assert {"RunStatus", "JobStatus", "SearchStatus", "TrialState"} <= set(enums) and "queued" in enums["RunStatus"]
    probe = tmp_path / "probe.py"
    probe.write_text('"""Docstring: failed."""\nWORDS = {RunStatus.FAILED: "failed"}\n'
                     'if run.status == "failed":\n    pass\n')
    assert status_literals(probe, enums) == ["probe.py:3 'failed'"]


@pytest.mark.parametrize("path", PRODUCT_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_status_words_come_from_the_status_modules(path: Path) -> None:
    assert not status_literals(path, status_enums())


# --- one follow loop ----------------------------------------------------------------------------
FRONT_END_FILES = [WORKBENCH / "api.py", *sorted((WORKBENCH / "cli").glob("*.py"))]


def polls(path: Path) -> list[str]:
    """``file:line`` of each call that waits or starts a worker: following a job is workbench.follow's."""
    rel = path.relative_to(REPO_ROOT)
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
    return [f"{rel}:{n.lineno} {n.func.attr}" for n in calls
            if isinstance(n.func, ast.Attribute) and n.func.attr in ("sleep", "ensure_worker")]


@pytest.mark.parametrize("path", FRONT_END_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_front_ends_follow_jobs_through_the_one_follow_loop(path: Path) -> None:
    assert not polls(path)


# --- tests share builders, not each other ----------------------------------------------------------
TEST_MODULES = sorted((REPO_ROOT / "tests").glob("test_*.py"))


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda p: p.name)
def test_no_test_module_imports_another(path: Path) -> None:
    found = [f"{path.name}:{imp.line} imports {imp.module}" for imp in imports(path)
             if imp.module.split(".")[0].startswith("test_")]
    assert not found, "move what is shared to tests/builders.py: " + "; ".join(found)


# --- pages read typed views, not dictionary keys ---------------------------------------------
# Receivers a page may index by a string: Streamlit's own state, help-text tables, and values a page
# builds or a service computes live (not a stored record). Anything else indexed by a literal key is
# a stored record read around its view: add a field to the view in workbench/views/ instead.
KEYED_ANYWHERE = {
    "st.session_state": "Streamlit's session state: the page's own keys",
    "st.query_params": "the URL's query parameters", "qp": "st.query_params, named short",
    "ui.METRIC_HELP": "help text per metric (a constant table)", "wording.HELP": "help text (a constant table)",
}
KEYED_IN_PAGE = {
    ("auto.py", "d"): "device profiles from ui.cached_devices (the recommender's list, not a stored record)",
    ("recommend.py", "d"): "device profiles from ui.cached_devices",
    ("recommend.py", "devices"): "device profiles by name",
    ("recommend.py", "rec"): "the recommender's live answer (ui.cached_recommendation), computed per request",
    ("recommend.py", "best"): "the recommended candidate of that answer",
    ("recommend.py", "cnd"): "a candidate of that answer", ("recommend.py", "x"): "a candidate of that answer",
    ("recommend.py", "ch"): "one budget check of a candidate",
    ("recommend.py", "budget"): "the budget dict views.recommend_budget built from this page's form",
    ("train.py", "w"): "a row of ui.weights_table (which weights are on disk)",
    ("train.py", "curves"): "a column of a pandas DataFrame of views.run_curves",
    ("runs.py", "curves"): "a column of a pandas DataFrame of views.run_curves",
    ("runs.py", "pts"): "a column of a pandas DataFrame of views.run_points",
}


def receiver(node: ast.expr) -> str:
    """The dotted name a lookup starts from: ``cal["after"]["ece"]`` -> "cal", ``st.session_state`` itself."""
    while isinstance(node, (ast.Subscript, ast.Call)):
        node = node.value if isinstance(node, ast.Subscript) else node.func
    return ast.unparse(node)


def keyed_lookups(source: str, page: str) -> list[str]:
    """``page:line receiver["key"]`` for each ``x.get("key")`` call and ``x["key"]`` read not allowed above."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target, key = node.func.value, node.args[0].value
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            target, key = node.value, node.slice.value
        else:
            continue
        name = receiver(target)
        if name not in KEYED_ANYWHERE and (page, name) not in KEYED_IN_PAGE:
            found.append(f"{page}:{node.lineno} {name}[{key!r}]")
    return sorted(found)


def test_the_keyed_lookup_scan_finds_dictionary_reads() -> None:
    source = ("h = ds.health\nsc = h.get('shortcuts') or {}\nx = sm['test_accuracy']\nsm['n'] = 1\n"
              "st.session_state.get('k')\nm = ev.metrics['calibration']['before']\ncurves['metric']\n")
    assert keyed_lookups(source, "evaluate.py") == [
        "evaluate.py:2 h['shortcuts']", "evaluate.py:3 sm['test_accuracy']", "evaluate.py:6 ev.metrics['before']",
        "evaluate.py:6 ev.metrics['calibration']", "evaluate.py:7 curves['metric']"]
    assert keyed_lookups("curves['metric']", "train.py") == []  # allowed where it is listed


@pytest.mark.parametrize("path", PAGES, ids=lambda p: f"pages/{p.name}")
def test_pages_read_stored_records_through_typed_views(path: Path) -> None:
    assert not keyed_lookups(path.read_text(), path.name)


def test_every_keyed_lookup_exception_is_still_used() -> None:
    used = {(p.name, receiver(n.value if isinstance(n, ast.Subscript) else n.func.value))  # type: ignore[attr-defined]
            for p in PAGES for n in ast.walk(ast.parse(p.read_text()))
            if (isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant))
            or (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get")}
    assert not set(KEYED_IN_PAGE) - used, "listed exceptions no page needs any more: remove them"


# Validation chooses, test reports (issue 25): a function of the read models that picks a default, sorts,
# ranks or names the best may not read a test figure ("test_..." key or attribute).
CHOOSER = ("default", "sort", "best", "pareto", "rank")
VIEW_FILES = sorted((WORKBENCH / "views").glob("*.py"))


def chooser_test_reads(source: str, name: str) -> list[str]:
    """``file:line key`` for each ``test_...`` string or attribute read inside a choosing function."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and any(word in fn.name.lower() for word in CHOOSER):
            for node in ast.walk(fn):
                key = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                       else node.attr if isinstance(node, ast.Attribute) else "")
                if key.startswith("test_"):
                    found.append(f"{name}:{node.lineno} {fn.name} reads {key}")
    return sorted(set(found))


def test_the_chooser_scan_finds_a_test_figure() -> None:
    # The Predict default as it was before issue 25: it ranked by the test macro-F1.
    old = ("def default_predict_run(rows):\n    def rank(row):\n        return summary_view(row[1]).test_macro_f1\n"
           "    return max(rows, key=rank)\n\ndef report(sm):\n    return sm['test_accuracy']\n")
    assert chooser_test_reads(old, "runs.py") == ["runs.py:3 default_predict_run reads test_macro_f1",
                                                  "runs.py:3 rank reads test_macro_f1"]
    assert chooser_test_reads("def sort_key(sm):\n    return sm.get('test_accuracy')\n", "x.py") == [
        "x.py:2 sort_key reads test_accuracy"]


@pytest.mark.parametrize("path", VIEW_FILES, ids=lambda p: f"workbench/views/{p.name}")
def test_no_default_sort_or_best_reads_a_test_figure(path: Path) -> None:
    assert not chooser_test_reads(path.read_text(), path.name), (
        "validation chooses, test reports: rank by Run.best_metrics, never by a test_ figure")
