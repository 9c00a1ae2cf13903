"""A model plugin that finds nothing, at no cost: `fpn run -m benchmarks/null_model.py:NullModel` measures what
the pipeline itself (decode, transfer, rows, write) can carry, the ceiling of `fpn run` on a node."""
from __future__ import annotations

import torch

from fpn_model.config import ModelConfig


class NullModel(torch.nn.Module):
    config = ModelConfig(num_classes=2, class_names=("object",))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        empty = torch.zeros((0, 4))
        return [{"boxes": empty, "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                 "levels": torch.zeros(0, dtype=torch.int8)} for _ in images]
