"""ONNX model files as data: a model may name no other file, and ONNX Runtime gets no chance to open one.

An ONNX tensor may keep its bytes in an "external data" file named by a path, and ONNX Runtime
reads that file (relative to the model's folder, or to the process's working directory when the
model comes as bytes). A tensor can sit in many places of the protobuf: initializers, sparse
initializers (values and indices), node attributes (``t``, ``tensors``, ``sparse_tensor``,
``sparse_tensors``), subgraphs of If/Loop/Scan at any depth, function bodies, training-info graphs.
Listing those places is how the last hole happened (sparse tensors were missed), so the check here
walks *every* message of the model and refuses any ``TensorProto`` wherever it sits whose data is
external. Two further layers:

* ONNX Runtime is handed the model re-serialised from the checked message, with unknown fields
  dropped, so it sees exactly what was checked;
* the session is always created from bytes with the external-initializer folder set to a fresh,
  empty directory, so even a reference this check missed finds no file to read.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# ONNX Runtime's session option (onnxruntime_session_options_config_keys.h): where external
# initializers of a model loaded from bytes are looked up (default: the working directory).
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class ModelFileError(ValueError):
    """The model file is refused; ``str(err)`` says why in plain words."""


def _messages(msg: Any, where: str) -> Iterator[tuple[Any, str]]:
    """Every protobuf message inside ``msg`` (itself included), with a readable path to it."""
    yield msg, where
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        repeated = not hasattr(value, "ListFields")  # a repeated field (or a map) holds several
        items = list(value.values() if hasattr(value, "values") else value) if repeated else [value]
        for i, item in enumerate(items):
            if not hasattr(item, "ListFields"):  # a map of scalars
                continue
            name = getattr(item, "name", "") or ""
            label = f"{field.name}[{i}]" if repeated else field.name
            yield from _messages(item, f"{where}.{label}" + (f" ({name!r})" if name else ""))


def _is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def file_references(model: Any) -> list[str]:
    """Where ``model`` (an ``onnx.ModelProto``) names a file: one readable line each; [] when none."""
    found = []
    for msg, where in _messages(model, "model"):
        if msg.DESCRIPTOR.full_name == "onnx.TensorProto" and _is_external(msg):
            location = next((e.value for e in msg.external_data if e.key == "location"), "?")
            found.append(f"{where} -> {location!r}")
    return found


def checked_model_bytes(data: bytes) -> bytes:
    """``data`` parsed, checked to name no file, and serialised again without unknown fields:
    the bytes to give ONNX Runtime. Raises ``ModelFileError`` saying why otherwise."""
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf raises its own DecodeError
        raise ModelFileError(f"not a readable ONNX model ({e})") from None
    refs = file_references(proto)
    if refs:
        shown = "; ".join(refs[:3]) + (f"; and {len(refs) - 3} more" if len(refs) > 3 else "")
        raise ModelFileError("refers to external data files, and a model must be self-contained "
                             f"(a crafted model could read other files this way): {shown}")
    proto.DiscardUnknownFields()
    return bytes(proto.SerializeToString())


def model_session(model: bytes | str | Path, options: Any = None, providers: Sequence[Any] | None = None) -> Any:
    """An ONNX Runtime session for a model file or its bytes, checked by ``checked_model_bytes``
    and created by ``session_without_files``. Raises ``ModelFileError`` when refused."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return session_without_files(checked_model_bytes(data), options, providers)


def session_without_files(data: bytes, options: Any = None, providers: Sequence[Any] | None = None) -> Any:
    """An ONNX Runtime session from model bytes whose external-data lookups go to an empty folder,
    removed once the session is made: no file reference in the model can find a file."""
    import onnxruntime as ort

    opts = options or ort.SessionOptions()
    with tempfile.TemporaryDirectory(prefix="wb-onnx-nofiles-") as empty:
        opts.add_session_config_entry(EXTERNAL_FOLDER_KEY, empty)
        return ort.InferenceSession(data, opts, providers=list(providers or ["CPUExecutionProvider"]))


__all__ = ["EXTERNAL_FOLDER_KEY", "ModelFileError", "checked_model_bytes", "file_references", "model_session",
           "session_without_files"]
