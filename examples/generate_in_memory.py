"""Synthetic tissue in memory through the library API, e.g. to feed a data loader.

    python examples/generate_in_memory.py            # the bundled model
    python examples/generate_in_memory.py runs/r1    # your own

Each item is a pure function of (model, seed, size): item i of the dataset is always the same
image, in any worker, in any order.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader, Dataset

from nca_tiles import generate_region, load_model


class SyntheticTissue(Dataset):
    """``length`` synthetic tiles of ``size`` px; tile i is generated with seed ``base_seed + i``."""

    def __init__(self, model_path: str | None = None, length: int = 8, size: int = 128, steps: int = 20, base_seed: int = 0):
        self.model = load_model(model_path, device="cpu")
        self.length, self.size, self.steps, self.base_seed = length, size, steps, base_seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        image = generate_region(self.model, self.size, self.size, seed=self.base_seed + i, steps=self.steps)
        return torch.from_numpy(image).permute(2, 0, 1)  # uint8 (3, H, W)


if __name__ == "__main__":
    dataset = SyntheticTissue(sys.argv[1] if len(sys.argv) > 1 else None, length=4, size=96, steps=10)
    for batch in DataLoader(dataset, batch_size=2):
        print(batch.shape, batch.dtype, f"mean RGB {batch.float().mean(dim=(0, 2, 3)).tolist()}")
    # The same seed gives the same pixels: a canvas region is reproducible.
    assert torch.equal(dataset[1], dataset[1])
    print(f"µm/px of the model's training data: {dataset.model.mpp}")
