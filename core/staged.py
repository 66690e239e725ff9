"""The network in named parts: what transfer learning needs from any family's model.

A family's network subclasses ``StagedModel`` and declares its parts, input to output:
``stage_names`` (the backbone stages), ``entry_points`` (the tensor entering each part: "image"
first, then e.g. the stages, ending "features", "embedding", "logits"), ``parameter_group_names``
(stem, the stages, the layers after them, "classifier") and ``group_modules``; plus
``_run_segment`` (one part). Training freezes, caches and cuts the network through these names
only, so a family with another number of stages trains the same way.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class StagedModel(nn.Module):
    """A classifier made of named parts, with a transfer-learning API (timm's idioms)."""

    # Declared by the family's network:
    stage_names: tuple[str, ...] = ()
    entry_points: tuple[str, ...] = ()
    parameter_group_names: tuple[str, ...] = ()
    # Where a group's input arrives when it is not the entry point of the same name.
    group_inputs: Mapping[str, str] = {"stem": "image", "classifier": "embedding"}
    # Set by the family's __init__ (checkpoints store variant name, padding and bn_eps).
    variant: Any
    padding: str
    bn_eps: float
    num_features: int
    num_classes: int
    drop_rate: float
    classifier: nn.Module

    def _run_segment(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        """The part from ``entry`` to the next entry point."""
        raise NotImplementedError

    def group_modules(self) -> dict[str, list[nn.Module]]:
        """Modules per parameter group, input to output (to freeze them and put frozen BatchNorms in eval mode)."""
        raise NotImplementedError

    def init_weights(self) -> None:
        """timm's EfficientNet-family init: He-normal over fan-out, BatchNorm at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[0])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    # -- names ------------------------------------------------------------------------------
    def entry_position(self, entry: str) -> int:
        """Position of a named entry point along the network (to order and compare them)."""
        try:
            return self.entry_points.index(entry)
        except ValueError:
            raise ValueError(f"Unknown entry point {entry!r}; known: {', '.join(self.entry_points)}") from None

    def group_entry(self, group: str) -> str:
        """The entry point where a parameter group's input arrives."""
        if group not in self.parameter_group_names:
            raise ValueError(f"Unknown parameter group {group!r}; known: {', '.join(self.parameter_group_names)}")
        return self.group_inputs.get(group, group)

    def top_groups(self, stages: int) -> list[str]:
        """The top ``stages`` stages and every group above them (what a fine-tune phase trains)."""
        if not 0 <= stages <= len(self.stage_names):
            raise ValueError(f"unfreeze_stages must be 0..{len(self.stage_names)} for "
                             f"{getattr(self.variant, 'name', self.variant)}, got {stages}")
        last = self.parameter_group_names.index(self.stage_names[-1])
        return [*self.stage_names[len(self.stage_names) - stages:], *self.parameter_group_names[last + 1:]]

    # -- running parts ----------------------------------------------------------------------
    def forward_between(self, x: torch.Tensor, entry: str, stop: str) -> torch.Tensor:
        """Run from entry point ``entry`` (``x`` is the tensor arriving there) up to ``stop``."""
        start, end = self.entry_position(entry), self.entry_position(stop)
        if end < start:
            raise ValueError(f"Cannot run backwards from {entry!r} to the earlier point {stop!r}.")
        for name in self.entry_points[start:end]:
            x = self._run_segment(name, x)
        return x

    def forward_from(self, entry: str, x: torch.Tensor) -> torch.Tensor:
        """Logits from the tensor arriving at ``entry`` (timm's idiom): what a partly frozen,
        partly cached network trains through. ``forward_from("image", x)`` is ``forward(x)``."""
        return self.forward_between(x, entry, "logits")

    def forward_intermediates(self, x: torch.Tensor, points: Sequence[str],
                              entry: str = "image") -> list[torch.Tensor]:
        """The tensors at the named ``points`` (in the order asked), from ``x`` arriving at
        ``entry``; stops at the last point asked for (nothing above it runs)."""
        wanted = {self.entry_position(p) for p in points}
        start = self.entry_position(entry)
        if min(wanted) < start:
            raise ValueError(f"Points {list(points)} include one before the entry {entry!r}.")
        found: dict[int, torch.Tensor] = {start: x}
        for pos in range(start, max(wanted)):
            x = self._run_segment(self.entry_points[pos], x)
            found[pos + 1] = x
        return [found[self.entry_position(p)] for p in points]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map (N, C, h, w): what Grad-CAM looks at."""
        return self.forward_between(x, "image", "features")

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean((2, 3))

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (N, num_features): what a frozen-backbone head trains on."""
        return self.forward_between(x, "image", "embedding")

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.drop_rate > 0 and self.training:
            embedding = F.dropout(embedding, self.drop_rate, True)
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_between(x, "image", "logits")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh linear layer for `num_classes` classes."""
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    # -- parameter groups -------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per named group, input to output."""
        return {g: [p for m in mods for p in m.parameters()] for g, mods in self.group_modules().items()}

    def group_state_prefixes(self, groups: Sequence[str]) -> tuple[str, ...]:
        """State-dict key prefixes of the named groups (weights and BatchNorm buffers)."""
        names = {id(m): n for n, m in self.named_modules()}
        mods = self.group_modules()
        return tuple(f"{names[id(m)]}." for g in groups for m in mods[g])

    def set_trainable(self, groups: Sequence[str]) -> None:
        """Train only the named groups; everything else is frozen."""
        wanted = set(groups)
        unknown = wanted - set(self.parameter_group_names)
        if unknown:
            raise ValueError(f"Unknown parameter groups {sorted(unknown)}; known: {list(self.parameter_group_names)}")
        for name, params in self.parameter_groups().items():
            for p in params:
                p.requires_grad_(name in wanted)
