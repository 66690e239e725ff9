"""Open a deploy bundle as data, never as code, and predict with it in-process.

A bundle (the zip ``core.export.build_bundle`` writes, or that zip unpacked into a folder) is
read with the same guards as a dataset upload (``core.ingest``: entry count, sizes, compression
ratio, zip-slip names, symlinks). Every file must be listed in its ``manifest.json`` with the
right sha256, and no other file may be present. Only then are ``model.onnx`` (ONNX Runtime),
``labels.json``, ``preprocessing.json`` and ``calibration.json`` loaded, from the very bytes that
were hashed. The bundle's ``predict.py`` is hashed like any file but never imported or run here.

``calibration.json`` is the evaluation's temperature (fitted on the validation split) and, for
two-class models, the decision threshold; every reader reports softmax(logits / T), so the
confidences a user sees are the calibrated ones the model card describes. Its ``ood`` part is
the out-of-distribution check: an energy score and the threshold (fitted on the validation
split to keep 95 % of its images) past which an image "looks unlike the training images".

The manifest may carry an HMAC-SHA256 signature over its canonical JSON, made with this
installation's key (the caller passes it; core reads no environment variable).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from core.images import ImageDecodeError, load_rgb
from core.ingest import IngestError, IngestLimits, open_zip, scan_folder, scan_zip
from core.metrics import softmax
from core.onnx_files import ModelFileError, model_session
from core.preprocessing import Preprocessing, preprocess

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "workbench-bundle"
FORMAT_VERSION = 1
SIGNATURE_ALGORITHM = "HMAC-SHA256"
REQUIRED_FILES = ("model.onnx", "labels.json", "preprocessing.json")
# Optional so that bundles exported before it existed still open (reported as not calibrated).
CALIBRATION_NAME = "calibration.json"
CALIBRATION_VERSION = 1
NOT_CALIBRATED_NO_VAL = "not calibrated: no validation images"
NOT_CALIBRATED_NO_EVAL = "not calibrated: the model has not been evaluated"
NOT_CALIBRATED_OLD_BUNDLE = "not calibrated: this bundle has no calibration.json (exported before Workbench added it)"
NOT_CALIBRATED = "not calibrated: no temperature was given"
# Above this test ECE a fitted temperature is not worth the "90 % means 90 % right" sentence.
WELL_CALIBRATED_ECE = 0.05
# The dataset-upload guards, with room for a handful of files instead of a dataset.
BUNDLE_LIMITS = IngestLimits(max_entries=64, max_total_bytes=4 * 2**30)
MAX_SMALL_FILE_BYTES = 16 * 2**20  # manifest.json, labels.json, preprocessing.json
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """The bundle is refused or unusable; ``str(err)`` names the file and says why."""


class Signature(StrEnum):
    """What is known about who made a bundle. Only VALID says "signed": a signature nobody here
    could check may be stale or forged (the manifest re-hashed after a file was swapped)."""
    VALID = "signed by this installation's key"
    UNCHECKED = ("carries a signature that could not be checked here (no WORKBENCH_BUNDLE_KEY is configured), "
                 "so who made it is unknown")
    UNSIGNED = "unsigned"


# ------------------------------------------------------------------------------------------
# The manifest
# ------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    """The exact bytes a signature covers: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_signature(manifest: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) over the canonical JSON of the manifest without its signature."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def make_manifest(hashes: dict[str, str], *, run_id: int | str | None = None, key: bytes | None = None,
                  created: datetime | None = None) -> dict[str, Any]:
    """The manifest for files ``{name: sha256}``; signed when ``key`` is given."""
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": (created or datetime.now(UTC)).isoformat(timespec="seconds"),
        "run_id": None if run_id is None else str(run_id),
        "files": dict(sorted(hashes.items())),
    }
    if key:
        manifest["signature"] = {"algorithm": SIGNATURE_ALGORITHM, "value": manifest_signature(manifest, key)}
    return manifest


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{MANIFEST_NAME}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{MANIFEST_NAME}: not a Workbench bundle manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise BundleError(f"{MANIFEST_NAME}: format version {version!r} is not one this Workbench reads "
                          f"(1 to {FORMAT_VERSION})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(n, str) and isinstance(h, str) and _SHA256.match(h) for n, h in files.items()):
        raise BundleError(f"{MANIFEST_NAME}: 'files' must map each file name to its sha256 (64 hex digits)")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{MANIFEST_NAME}: lists no {name}; not a Workbench bundle")
    return manifest


def check_signature(manifest: dict[str, Any], key: bytes | None, allow_unsigned: bool = False) -> Signature:
    """Signature status, or BundleError: a bad signature is always refused; an unsigned bundle
    is refused when a key is configured, unless ``allow_unsigned``."""
    sig = manifest.get("signature")
    if sig is None:
        if key and not allow_unsigned:
            raise BundleError(f"{MANIFEST_NAME}: the bundle is unsigned, and this installation signs its bundles "
                              "(WORKBENCH_BUNDLE_KEY is set); pass --allow-unsigned to use it anyway")
        return Signature.UNSIGNED
    if not (isinstance(sig, dict) and sig.get("algorithm") == SIGNATURE_ALGORITHM
            and isinstance(sig.get("value"), str)):
        raise BundleError(f"{MANIFEST_NAME}: the signature is malformed (expected {SIGNATURE_ALGORITHM})")
    if not key:
        return Signature.UNCHECKED
    if not hmac.compare_digest(sig["value"], manifest_signature(manifest, key)):
        raise BundleError(f"{MANIFEST_NAME}: the signature does not match this installation's key "
                          "(bundle altered, or signed with another key)")
    return Signature.VALID


# ------------------------------------------------------------------------------------------
# Calibration: the temperature and the two-class decision, as data
# ------------------------------------------------------------------------------------------
def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """A threshold on softmax(logits)[positive] moved onto softmax(logits / T)[positive].

    With two classes p(positive) = sigmoid(margin) and the calibrated one is sigmoid(margin / T):
    a monotone map of the same margin, so every decision stays the same (up to rounding)."""
    if threshold <= 0.0 or threshold >= 1.0:
        return min(max(threshold, 0.0), 1.0)
    margin = math.log(threshold) - math.log1p(-threshold)
    return _sigmoid(margin / temperature)


# ------------------------------------------------------------------------------------------
# Out of distribution: "this image looks unlike the images the model was trained on"
# ------------------------------------------------------------------------------------------
# The energy score (Liu et al. 2020), -logsumexp(logits) at T = 1, rather than the max logit: it
# uses every class's logit, not only the winner's, and on a beans model (lite0, quick recipe,
# 128 px) it flagged more foreign images at the same 95 % kept (mednist 37 % vs 28 %,
# hymenoptera 32 % vs 8 %: bench/results_ood.md). T = 1, not the calibration temperature, so the score and its
# threshold do not move when the model is re-calibrated. Higher energy = less familiar.
OOD_SCORE = "energy"
OOD_FORMULA = "-logsumexp(logits)"
OOD_KEEP = 0.95  # share of the validation images kept (not flagged) by the threshold
OUTSIDE_TRAINING_DATA = ("This image looks unlike the images the model was trained on; its answer is not "
                         "reliable.")


def energy_score(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits) per row (float64, max subtracted); higher = less like the training images."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[None]
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def ood_sentence(record: dict[str, Any]) -> str | None:
    """The model card's one plain sentence on the check (None when the bundle has none)."""
    ood = record.get("ood") or {}
    if ood.get("threshold") is None:
        return None
    return (f"Images that look unlike the training images are flagged as \"not reliable\" instead of getting a "
            f"silent answer: the limit was set on {ood.get('n_val', 'the')} validation images so that "
            f"{OOD_KEEP:.0%} of them pass (score: {ood.get('score', OOD_SCORE)} = {ood.get('formula', OOD_FORMULA)}, "
            f"flagged above {float(ood['threshold']):.3f}).")


def _ood_part(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """calibration.json's ``ood`` from an evaluation's ``metrics["ood"]`` (core.evaluate.fit_ood_threshold)."""
    ood = (metrics or {}).get("ood") or {}
    thr = ood.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, int | float) or not math.isfinite(thr):
        return None
    return {"score": OOD_SCORE, "formula": OOD_FORMULA, "threshold": float(thr),
            "rule": "outside the training data when score > threshold", "keep": ood.get("keep", OOD_KEEP),
            "fitted_on": "validation split", "n_val": ood.get("n_val"), "val_kept": ood.get("val_kept"),
            "test_flagged": ood.get("test_flagged")}


def _rates(sens: Any, spec: Any) -> dict[str, float] | None:
    return None if sens is None or spec is None else {"sensitivity": float(sens), "specificity": float(spec)}


def calibration_record(metrics: dict[str, Any] | None, classes: Sequence[str]) -> dict[str, Any]:
    """The content of ``calibration.json`` from an evaluation's metrics (``core.evaluate``):
    temperature (1.0 when none was fitted, saying why), ECE on test before/after and, for two
    classes, the validation-chosen threshold moved onto the calibrated probability."""
    cal = (metrics or {}).get("calibration") or {}
    temp = cal.get("temperature")
    t = float(temp) if isinstance(temp, int | float) and not isinstance(temp, bool) else float("nan")
    fitted = math.isfinite(t) and t > 0
    if metrics is None:
        note = NOT_CALIBRATED_NO_EVAL
    elif fitted:
        note = f"temperature fitted on {cal.get('n_val', '?')} validation images"
    else:
        note = NOT_CALIBRATED_NO_VAL
    t = t if fitted else 1.0
    record: dict[str, Any] = {
        "format_version": CALIBRATION_VERSION,
        "calibrated": bool(fitted),
        "temperature": t,
        "probabilities": "softmax(logits / temperature)",
        "note": note,
        "fitted_on": "validation split" if fitted else None,
        "n_val": int(cal["n_val"]) if fitted and cal.get("n_val") is not None else None,
        "test": {"n": (metrics or {}).get("n"),
                 "ece_before": (cal.get("before") or {}).get("ece"),
                 "ece_after": (cal.get("after") or {}).get("ece") if fitted else None},
        "decision": None,
        "ood": _ood_part(metrics),
    }
    op = (metrics or {}).get("operating_point") or {}
    if len(classes) == 2 and "threshold" in op and op.get("positive_class") in classes:
        pos = str(op["positive_class"])
        on_val = op.get("chosen_on") == "val"
        record["decision"] = {
            "positive_class": pos,
            "negative_class": next(c for c in classes if c != pos),
            "threshold": calibrated_threshold(float(op["threshold"]), t),
            "rule": "positive_class when its probability >= threshold, else negative_class",
            "target_sensitivity": op.get("target_sensitivity"),
            "chosen_on": "validation split" if on_val else "test split (no validation images: optimistic)",
            "val": _rates(op.get("val_sensitivity"), op.get("val_specificity")) if on_val else None,
            "test": _rates(op.get("sensitivity"), op.get("specificity")),
        }
    elif len(classes) == 2:
        record["decision_note"] = op.get("error") or "the evaluation chose none"
    return record


def confidence_sentence(record: dict[str, Any]) -> str:
    """What the confidences of a ``calibration.json`` mean, in plain words, with the test figures."""
    test = record.get("test") or {}
    n = f"{test['n']} test images" if test.get("n") else "the test split"
    after, before = test.get("ece_after"), test.get("ece_before")
    raw = "" if before is None else f", against {before:.3f} for the model's raw scores"
    if record.get("calibrated") and after is not None:
        gap = f"confidence and accuracy differed by {after * 100:.1f} percentage points on average"
        if after <= WELL_CALIBRATED_ECE:
            return (f"Confidences are calibrated: of the images given 90 %, about 90 % are right, measured on the "
                    f"test split ({n}: {gap}, expected calibration error {after:.3f}{raw}).")
        return (f"Confidences were rescaled with a temperature but are still unreliable: on {n} {gap} (expected "
                f"calibration error {after:.3f}{raw}). Treat them as rough.")
    reason = str(record.get("note") or "not calibrated").removeprefix("not calibrated: ")
    text = (f"Confidences are NOT calibrated ({reason}): a confidence of 90 % need not mean that 90 % of such "
            "images are right.")
    return text + ("" if before is None else f" Expected calibration error on {n}: {before:.3f}.")


@dataclass(frozen=True)
class Calibration:
    """How logits become the probabilities and decisions a reader reports."""

    temperature: float = 1.0
    calibrated: bool = False
    note: str = NOT_CALIBRATED
    positive_class: str | None = None
    negative_class: str | None = None
    threshold: float | None = None  # on the calibrated probability of positive_class
    record: dict[str, Any] | None = None  # calibration.json as read
    ood_threshold: float | None = None  # energy above it: outside the training data (None: no check)

    @classmethod
    def from_record(cls, record: Any, labels: Sequence[str]) -> Calibration:
        """Validate ``calibration.json`` content against the labels; BundleError naming the file."""
        def bad(why: str) -> BundleError:
            return BundleError(f"{CALIBRATION_NAME}: {why}")

        if not isinstance(record, dict):
            raise bad("must be a JSON object")
        temp = record.get("temperature")
        if isinstance(temp, bool) or not isinstance(temp, int | float) or not math.isfinite(temp) or temp <= 0:
            raise bad(f"temperature must be a positive number, got {temp!r}")
        dec = record.get("decision")
        pos = neg = thr = None
        if dec is not None:
            if not isinstance(dec, dict) or len(labels) != 2:
                raise bad("a decision threshold is only defined for a two-class model")
            pos, neg, thr = dec.get("positive_class"), dec.get("negative_class"), dec.get("threshold")
            if pos not in labels or neg not in labels or pos == neg:
                raise bad(f"decision classes {pos!r}/{neg!r} are not the model's classes {list(labels)}")
            if isinstance(thr, bool) or not isinstance(thr, int | float) or not 0.0 <= thr <= 1.0:
                raise bad(f"decision threshold must be a probability between 0 and 1, got {thr!r}")
            thr = float(thr)
        ood, ood_thr = record.get("ood"), None
        if ood is not None:  # absent in bundles exported before the check existed: no flag
            ood_thr = ood.get("threshold") if isinstance(ood, dict) else None
            if isinstance(ood_thr, bool) or not isinstance(ood_thr, int | float) or not math.isfinite(ood_thr):
                raise bad(f"ood.threshold must be a finite number, got {ood_thr!r}")
            if ood.get("score", OOD_SCORE) != OOD_SCORE:
                raise bad(f"ood.score {ood.get('score')!r} is not one this Workbench computes ({OOD_SCORE!r})")
            ood_thr = float(ood_thr)
        return cls(float(temp), bool(record.get("calibrated")), str(record.get("note") or ""), pos, neg, thr,
                   record, ood_thr)

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None, labels: Sequence[str]) -> Calibration:
        """From an evaluation's metrics directly (a run, no bundle in between)."""
        return cls.from_record(calibration_record(metrics, labels), labels)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, self.temperature)

    def outside(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(energy scores, flags) for a (N, K) batch of raw logits; None when there is no threshold."""
        if self.ood_threshold is None:
            return None
        scores = energy_score(logits)
        return scores, scores > self.ood_threshold

    def decide(self, probs: np.ndarray, labels: Sequence[str]) -> tuple[str, float] | None:
        """(decision, calibrated p(positive)) of one image's probabilities, or None without a threshold."""
        if self.threshold is None or self.positive_class is None or self.negative_class is None:
            return None
        p = float(probs[list(labels).index(self.positive_class)])
        return (self.positive_class if p >= self.threshold else self.negative_class), p

    def describe(self) -> str:
        """One line for people: what the confidences mean and how the decision is made."""
        if self.calibrated:
            text = f"confidences calibrated with temperature {self.temperature:.3f} ({self.note})"
        else:
            text = f"confidences {self.note}"
        if self.threshold is not None:
            text += (f"; decision: '{self.positive_class}' when its probability is at least {self.threshold:.4f}, "
                     f"else '{self.negative_class}'")
        if self.ood_threshold is not None:
            text += (f"; images whose {OOD_SCORE} score is above {self.ood_threshold:.3f} are flagged as unlike "
                     "the training images")
        return text


def _calibration(data: bytes, labels: Sequence[str]) -> Calibration:
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{CALIBRATION_NAME}: not valid JSON ({e})") from None
    return Calibration.from_record(record, labels)


# ------------------------------------------------------------------------------------------
# Reading members with the ingest guards
# ------------------------------------------------------------------------------------------
class _Member(Protocol):
    """What core.ingest's scans return for a file: its name, declared size and an opener."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def open(self) -> Callable[[], IO[bytes]]: ...


def _scan(source: Path, limits: IngestLimits) -> tuple[dict[str, _Member], Callable[[], None]]:
    """The bundle's files by name, and a close function. Anything odd is refused, not skipped."""
    try:
        if source.is_dir():
            entries, dirs, skipped = scan_folder(source, limits)
            close: Callable[[], None] = lambda: None  # noqa: E731
        else:
            zf = open_zip(source)
            close = zf.close
            entries, dirs, skipped = scan_zip(zf, limits)
    except IngestError as e:
        raise BundleError(str(e)) from None
    try:
        if skipped:
            raise BundleError(f"{skipped[0].path}: {skipped[0].reason}; a bundle holds plain files only")
        if dirs:
            raise BundleError(f"{sorted(dirs)[0]}/: unexpected folder; a bundle holds plain files only")
    except BundleError:
        close()
        raise
    return {e.name: e for e in entries}, close


def _read(member: _Member, limit: int, keep: bool) -> tuple[str, bytes]:
    """sha256 of a member and (if ``keep``) its bytes; counts bytes really read, as headers can lie."""
    if member.size > limit:
        raise BundleError(f"{member.name}: larger than the limit of {limit:,} bytes")
    h, parts, n = hashlib.sha256(), [], 0
    with member.open() as f:
        while chunk := f.read(_CHUNK):
            n += len(chunk)
            if n > limit:
                raise BundleError(f"{member.name}: larger than the limit of {limit:,} bytes")
            h.update(chunk)
            if keep:
                parts.append(chunk)
    return h.hexdigest(), b"".join(parts)


def _check_names(members: Iterable[str], listed: Iterable[str]) -> None:
    present, expected = set(members) - {MANIFEST_NAME}, set(listed)
    for name in sorted(expected - present):
        raise BundleError(f"{name}: listed in the manifest but missing from the bundle")
    for name in sorted(present - expected):
        raise BundleError(f"{name}: not listed in the manifest (unexpected file in the bundle)")


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose every file matched its manifest; the loaded parts, from the hashed bytes."""

    source: Path
    manifest: dict[str, Any]
    signature: Signature
    model: bytes
    labels: list[str]
    preprocessing: Preprocessing
    calibration: Calibration = Calibration(note=NOT_CALIBRATED_OLD_BUNDLE)

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["files"])


def open_bundle(source: str | Path, *, key: bytes | None = None, allow_unsigned: bool = False,
                limits: IngestLimits | None = None) -> VerifiedBundle:
    """Check a bundle (zip or unpacked folder) and load its model, labels and preprocessing.

    Raises BundleError naming the file on anything wrong: unsafe archive, missing manifest,
    bad or missing signature (see ``check_signature``), missing, extra or altered file.
    """
    source = Path(source)
    limits = limits or BUNDLE_LIMITS
    members, close = _scan(source, limits)
    try:
        if MANIFEST_NAME not in members:
            raise BundleError(f"{MANIFEST_NAME}: missing, so the bundle cannot be checked "
                              "(not a Workbench bundle, or one exported before bundles had a manifest)")
        manifest = _parse_manifest(_read(members[MANIFEST_NAME], MAX_SMALL_FILE_BYTES, keep=True)[1])
        signature = check_signature(manifest, key, allow_unsigned)
        _check_names(members, manifest["files"])
        kept: dict[str, bytes] = {}
        for name, want in sorted(manifest["files"].items()):
            keep = name in REQUIRED_FILES or name == CALIBRATION_NAME
            got, data = _read(members[name], limits.max_file_bytes if name.endswith(".onnx") else MAX_SMALL_FILE_BYTES,
                              keep)
            if not hmac.compare_digest(got, want):
                raise BundleError(f"{name}: sha256 does not match the manifest (bundle altered?)")
            if keep:
                kept[name] = data
    finally:
        close()
    labels = _labels(kept["labels.json"])
    calibration = Calibration(note=NOT_CALIBRATED_OLD_BUNDLE)
    if CALIBRATION_NAME in kept:
        calibration = _calibration(kept[CALIBRATION_NAME], labels)
    return VerifiedBundle(source, manifest, signature, kept["model.onnx"], labels,
                          _preprocessing(kept["preprocessing.json"]), calibration)


def _labels(data: bytes) -> list[str]:
    try:
        labels = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"labels.json: not valid JSON ({e})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BundleError("labels.json: must be a non-empty list of class names")
    return labels


def _preprocessing(data: bytes) -> Preprocessing:
    try:
        return Preprocessing.from_dict(json.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"preprocessing.json: not valid Workbench preprocessing ({e})") from None


# ------------------------------------------------------------------------------------------
# Predicting
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str
    confidence: float
    top_k: tuple[tuple[str, float], ...]  # (label, probability), most likely first
    decision: str | None = None  # two-class models with a threshold: the class decided
    p_positive: float | None = None  # ... and the calibrated probability of the positive class
    outside_training_data: bool = False  # energy past the bundle's threshold: the answer is not reliable
    ood_score: float | None = None  # the energy score; None when the bundle has no check (older bundles)


SkipFn = Callable[[Path, str], None]


class BundlePredictor:
    """ONNX Runtime classifier with Workbench preprocessing: the one ONNX prediction path of
    Workbench, for a verified bundle and for a run's verified export alike. Probabilities are
    softmax(logits / T) with the calibration's temperature; two-class models also decide.

    ``device`` (auto, cpu, cuda, cuda:N; ``core.latency.ort_providers``): auto takes the CUDA
    execution provider when it is installed and a GPU is present; an explicit GPU that is not
    there raises ``core.train.robustness.DeviceError`` before the model is read. ``provider``
    says what ONNX Runtime runs on."""

    def __init__(self, model: bytes | Path, labels: Sequence[str], pre: Preprocessing,
                 calibration: Calibration | None = None, *, device: str = "auto") -> None:
        from core.latency import ort_providers

        providers = ort_providers(device)  # a DeviceError (the user's choice) is not the bundle's fault
        try:
            self._sess = model_session(model, providers=providers)
        except ModelFileError as e:
            raise BundleError(f"model.onnx: {e}") from None
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"model.onnx: ONNX Runtime cannot load it ({e})") from None
        self.provider: str = str(self._sess.get_providers()[0])
        self._input = self._sess.get_inputs()[0].name
        width = self._sess.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(labels):
            raise BundleError(f"labels.json: {len(labels)} labels, but model.onnx outputs {width} scores")
        self.labels, self.preprocessing = list(labels), pre
        self.calibration = calibration or Calibration()
        if self.calibration.positive_class is not None and self.calibration.positive_class not in self.labels:
            raise BundleError(f"{CALIBRATION_NAME}: positive class {self.calibration.positive_class!r} is not one "
                              f"of the labels {self.labels}")

    @classmethod
    def from_bundle(cls, bundle: VerifiedBundle, *, device: str = "auto") -> BundlePredictor:
        return cls(bundle.model, bundle.labels, bundle.preprocessing, bundle.calibration, device=device)

    @classmethod
    def from_onnx(cls, path: str | Path, metrics: dict[str, Any] | None = None, *,
                  device: str = "auto") -> BundlePredictor:
        """A Workbench ONNX export: labels and preprocessing come from its metadata; the
        temperature and threshold from ``metrics``, the run's latest evaluation (the caller
        reads it: core reads no database). Without it the confidences are not calibrated."""
        from core.onnx_export import read_metadata

        md = read_metadata(path)
        labels = json.loads(md["classes"])
        return cls(Path(path), labels, Preprocessing.from_dict(json.loads(md["preprocessing"])),
                   Calibration.from_metrics(metrics, labels), device=device)

    def predict(self, paths: Sequence[Path], top_k: int = 3, *, on_skip: SkipFn | None = None,
                batch_size: int = 16) -> list[Prediction]:
        """One row per readable image, in order; unreadable ones go to ``on_skip(path, reason)``."""
        k = max(1, min(top_k, len(self.labels)))
        rows: list[Prediction] = []
        for i in range(0, len(paths), batch_size):
            xs, ok = [], []
            for p in paths[i:i + batch_size]:
                try:
                    xs.append(preprocess(load_rgb(p), self.preprocessing))
                    ok.append(Path(p))
                except (ImageDecodeError, OSError, ValueError) as e:  # one bad file must not stop the rest
                    if on_skip:
                        on_skip(Path(p), str(e))
            if xs:
                logits = self._sess.run(None, {self._input: np.stack(xs)})[0]
                probs = self.calibration.probabilities(logits)
                ood = self.calibration.outside(logits)
                rows += [self._row(p, pr, k, None if ood is None else (float(ood[0][j]), bool(ood[1][j])))
                         for j, (p, pr) in enumerate(zip(ok, probs))]
        return rows

    def _row(self, path: Path, probs: np.ndarray, k: int, ood: tuple[float, bool] | None) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:k]
        top = tuple((self.labels[j], float(probs[j])) for j in order)
        decided = self.calibration.decide(probs, self.labels)
        decision, p_positive = decided if decided is not None else (None, None)
        score, flag = ood if ood is not None else (None, False)
        return Prediction(path, top[0][0], top[0][1], top, decision, p_positive, outside_training_data=flag,
                          ood_score=score)


__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_LIMITS", "CALIBRATION_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "OOD_KEEP", "OOD_SCORE",
    "OUTSIDE_TRAINING_DATA", "REQUIRED_FILES",
    "BundleError", "BundlePredictor", "Calibration", "Prediction", "Signature", "VerifiedBundle",
    "calibrated_threshold", "calibration_record", "canonical_json", "check_signature", "confidence_sentence",
    "energy_score", "make_manifest", "ood_sentence", "manifest_signature", "open_bundle",
]
