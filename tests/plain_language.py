"""Does a rendered page read as plain language? A reusable check for AppTests.

Walks what a user reads on an AppTest page (titles, markdown, captions, alerts, metrics,
dataframe column labels and cells) and reports raw snake_case field names (``onnx_mb``,
``latency_p50_ms``) and the words "None" / "nan". Inline code (`...`), paths, file names and
addresses are skipped (a folder name is what the user typed), and ``allow`` lists words the
user chose themselves (class and dataset names).
"""
from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from typing import Any

SNAKE = re.compile(r"(?<![\w./\\-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w./\\-])")
MISSING = re.compile(r"(?<![\w.])(None|nan|NaN)(?![\w.])")
CODE = re.compile(r"`[^`]*`")
PATHLIKE = re.compile(r"\S*[/\\]\S*|\S+\.\w{2,4}\b|https?://\S+")


def _strip(text: str) -> str:
    return PATHLIKE.sub(" ", CODE.sub(" ", text))


def rendered_texts(at: Any) -> Iterator[tuple[str, str]]:
    """(where, text) for every piece of text a user reads on the page."""
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "success", "error"):
        for el in getattr(at, kind):
            yield kind, str(el.value)
    for m in at.metric:
        yield "metric label", str(m.label)
        yield "metric value", str(m.value)
    for i, df in enumerate(at.dataframe):
        frame = df.value
        for col in frame.columns:
            yield f"dataframe {i} column", str(col)
        if frame.index.name is None and not isinstance(frame.index[0] if len(frame.index) else 0, int):
            for label in frame.index:
                yield f"dataframe {i} row label", str(label)
        for row in frame.itertuples(index=False):
            for cell in row:
                if cell is None or (isinstance(cell, float) and math.isnan(cell)):
                    yield f"dataframe {i} cell", "None"
                else:
                    yield f"dataframe {i} cell", str(cell)


def plain_language_problems(at: Any, allow: Collection[str] = ()) -> list[str]:
    allowed = set(allow)
    problems = []
    for where, text in rendered_texts(at):
        clean = _strip(text)
        for word in allowed:
            clean = clean.replace(word, " ")
        for m in SNAKE.finditer(clean):
            problems.append(f"{where}: raw field name {m.group(0)!r} in {text[:120]!r}")
        for m in MISSING.finditer(clean):
            problems.append(f"{where}: {m.group(0)!r} shown in {text[:120]!r}")
    return problems


def assert_plain_language(at: Any, allow: Collection[str] = ()) -> None:
    """Fail, listing each occurrence, if the page shows a raw field name, "None" or "nan"."""
    problems = plain_language_problems(at, allow)
    assert not problems, "\n".join(problems[:30])
