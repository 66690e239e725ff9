"""Open a deploy bundle as data, never as code, and predict with it in-process.

A bundle (the zip ``core.export.build_bundle`` writes, or that zip unpacked into a folder) is
read with the same guards as a dataset upload (``core.ingest``: entry count, sizes, compression
ratio, zip-slip names, symlinks). Every file must be listed in its ``manifest.json`` with the
right sha256, and no other file may be present. Only then are ``model.onnx`` (ONNX Runtime),
``labels.json`` and ``preprocessing.json`` loaded, from the very bytes that were hashed. The
bundle's ``predict.py`` is hashed like any file but never imported or run here.

The manifest may carry an HMAC-SHA256 signature over its canonical JSON, made with this
installation's key (the caller passes it; core reads no environment variable).
"""
from __future__ import annotations

import hashlib
import hmac
import json
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
from core.preprocessing import Preprocessing, preprocess

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "workbench-bundle"
FORMAT_VERSION = 1
SIGNATURE_ALGORITHM = "HMAC-SHA256"
REQUIRED_FILES = ("model.onnx", "labels.json", "preprocessing.json")
# The dataset-upload guards, with room for a handful of files instead of a dataset.
BUNDLE_LIMITS = IngestLimits(max_entries=64, max_total_bytes=4 * 2**30)
MAX_SMALL_FILE_BYTES = 16 * 2**20  # manifest.json, labels.json, preprocessing.json
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class BundleError(ValueError):
    """The bundle is refused or unusable; ``str(err)`` names the file and says why."""


class Signature(StrEnum):
    VALID = "signed by this installation's key"
    UNCHECKED = "signed, but no WORKBENCH_BUNDLE_KEY is configured here to check the signature"
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
            keep = name in REQUIRED_FILES
            got, data = _read(members[name], limits.max_file_bytes if name.endswith(".onnx") else MAX_SMALL_FILE_BYTES,
                              keep)
            if not hmac.compare_digest(got, want):
                raise BundleError(f"{name}: sha256 does not match the manifest (bundle altered?)")
            if keep:
                kept[name] = data
    finally:
        close()
    return VerifiedBundle(source, manifest, signature, kept["model.onnx"], _labels(kept["labels.json"]),
                          _preprocessing(kept["preprocessing.json"]))


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


SkipFn = Callable[[Path, str], None]


def _refuse_external_data(model: bytes) -> None:
    """An ONNX file may point at 'external data' files by path; a bundle's model must be
    self-contained, or a crafted one could make ONNX Runtime read files outside the bundle."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        proto = onnx.load_from_string(model)
    except Exception as e:  # protobuf raises its own DecodeError
        raise BundleError(f"model.onnx: not a readable ONNX model ({e})") from None
    if any(uses_external_data(t) for t in _get_all_tensors(proto)):
        raise BundleError("model.onnx: refers to external data files; a bundle's model must be self-contained")


class BundlePredictor:
    """ONNX Runtime classifier with Workbench preprocessing: the one ONNX prediction path of
    Workbench, for a verified bundle and for a run's verified export alike."""

    def __init__(self, model: bytes | Path, labels: Sequence[str], pre: Preprocessing) -> None:
        import onnxruntime as ort

        src = model if isinstance(model, bytes) else str(model)
        try:
            self._sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise BundleError(f"model.onnx: ONNX Runtime cannot load it ({e})") from None
        self._input = self._sess.get_inputs()[0].name
        width = self._sess.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(labels):
            raise BundleError(f"labels.json: {len(labels)} labels, but model.onnx outputs {width} scores")
        self.labels, self.preprocessing = list(labels), pre

    @classmethod
    def from_bundle(cls, bundle: VerifiedBundle) -> BundlePredictor:
        _refuse_external_data(bundle.model)
        return cls(bundle.model, bundle.labels, bundle.preprocessing)

    @classmethod
    def from_onnx(cls, path: str | Path) -> BundlePredictor:
        """A Workbench ONNX export: labels and preprocessing come from its metadata."""
        from core.onnx_export import read_metadata

        md = read_metadata(path)
        return cls(Path(path), json.loads(md["classes"]), Preprocessing.from_dict(json.loads(md["preprocessing"])))

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
                probs = softmax(self._sess.run(None, {self._input: np.stack(xs)})[0])
                rows += [self._row(p, pr, k) for p, pr in zip(ok, probs)]
        return rows

    def _row(self, path: Path, probs: np.ndarray, k: int) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:k]
        top = tuple((self.labels[j], float(probs[j])) for j in order)
        return Prediction(path, top[0][0], top[0][1], top)


__all__ = [
    "BUNDLE_FORMAT", "BUNDLE_LIMITS", "FORMAT_VERSION", "MANIFEST_NAME", "REQUIRED_FILES", "BundleError",
    "BundlePredictor", "Prediction", "Signature", "VerifiedBundle", "canonical_json", "check_signature",
    "make_manifest", "manifest_signature", "open_bundle",
]
