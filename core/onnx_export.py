"""Export a model (any registered family) to ONNX with a dynamic batch axis and metadata in the file.

The one ONNX writer in the project: the recommender's latency probes, the run's automatic
fp32 export and the deploy bundle all call ``export_onnx``.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

OPSET = 17


def export_onnx(model: nn.Module, path: str | Path, resolution: int, *, metadata: dict[str, Any] | None = None,
                opset: int = OPSET) -> Path:
    """Write ``model`` (in eval mode, on CPU, fp32) to ``path``; input 'image' (N,3,R,R) -> 'logits'.

    ``metadata`` values are stored as ONNX metadata_props (non-strings as JSON).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval()
    dummy = torch.zeros(1, 3, resolution, resolution)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: our dynamic "same" padding is traced to constants for
            # the exported resolution, and the batch axis stays dynamic.
            torch.onnx.export(
                model.cpu(), (dummy,), buf,  # type: ignore[arg-type]  # file objects work too
                input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    tmp = path.with_suffix(path.suffix + ".part")
    onnx.save(proto, str(tmp))
    tmp.replace(path)  # never leave a half-written model under the final name
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
