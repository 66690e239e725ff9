"""ONNX export with a dynamic batch axis gives the same logits in ONNX Runtime."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.efficientnet import EfficientNet
from core.onnx_export import export_onnx, read_metadata

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("variant,padding,resolution", [("lite0", "same", 96), ("b0", "symmetric", 64),
                                                       ("b0", "same", 75)])
def test_onnx_matches_pytorch_at_batch_1_and_4(tmp_path: Path, variant: str, padding: str, resolution: int) -> None:
    torch.manual_seed(0)
    model = EfficientNet(variant, 5, padding=padding, bn_eps=1e-3).eval()
    path = export_onnx(model, tmp_path / "m.onnx", resolution, metadata={"labels": ["a", "b"], "variant": variant})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, resolution, resolution)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == (batch, 5)
        assert np.abs(got - ref).max() <= 1e-4
    meta = read_metadata(path)
    assert meta["variant"] == variant and meta["labels"] == '["a", "b"]'
    assert model.training is False
