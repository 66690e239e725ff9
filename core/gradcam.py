"""Grad-CAM on the last feature map (the model's "features" entry point).

cam = ReLU(sum_c w_c * A_c), w_c = spatial mean of d logit_target / d A_c, upsampled to the
input size. The last stage has the best class semantics (coarse: 1/32 of the input).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def grad_cam(model: Any, x: np.ndarray, target: int, device: str | None = None) -> np.ndarray:
    """Heatmap in [0, 1] with shape (R, R) for one preprocessed image ``x`` (1,3,R,R) or (3,R,R).

    ``device`` (auto, cpu, cuda, cuda:N; core.train.robustness.resolve_device): where to compute
    it, the model going back where it was afterwards; None: where the model is.
    """
    import torch
    import torch.nn.functional as F

    from core.train.robustness import resolve_device

    home = next(model.parameters()).device
    dev = resolve_device(device) if device is not None else home
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dev)
    if t.ndim == 3:
        t = t[None]
    was_training = model.training
    model.to(dev)
    model.eval()
    try:
        with torch.enable_grad():
            feats, = model.forward_intermediates(t, ["features"])  # (1, C, h, w)
            feats.retain_grad()
            logits = model.forward_from("features", feats)
            model.zero_grad(set_to_none=True)
            logits[0, int(target)].backward()
            weights = feats.grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * feats).sum(1, keepdim=True)).detach()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        model.to(home)
    heat = F.interpolate(cam, size=t.shape[-2:], mode="bilinear", align_corners=False)[0, 0].float().cpu().numpy()
    hi = float(heat.max())
    return (heat / hi).astype(np.float32) if hi > 0 else np.zeros_like(heat, dtype=np.float32)


def overlay(rgb_uint8: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heatmap over an RGB image (both H x W); returns uint8 RGB."""
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    heat = (cmap(np.clip(cam, 0, 1))[..., :3] * 255.0).astype(np.float32)
    out = (1 - alpha) * rgb_uint8.astype(np.float32) + alpha * heat
    return np.clip(out, 0, 255).astype(np.uint8)
