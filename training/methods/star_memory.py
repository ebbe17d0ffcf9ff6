"""STAR's class memory: a prototype and a few statistics per class, and the fake features drawn from them.

Per foreground class (Chen et al., NeurIPS 2023; jinpeng0528/STAR ``base/base_trainer.py``
``compute_prototypes`` 169-224, ``compute_noise`` 226-278, ``compute_cls_number`` 139-167):

- prototype: the L2-normalised sum of the L2-normalised features of the class (D values);
- noise: the per-dimension standard deviation of those normalised features around the class's own
  prototype (D), as the paper defines it. STAR's code, after step 0, measures the noise of the new
  classes around the wrong prototypes: ``compute_noise`` indexes the list that already holds the old
  classes first (``base_trainer.py`` 211, 235) with the new class's local index (258-259), so the first
  new class's noise is measured around class 1's prototype. That bug is not reproduced;
- norm mean and std: of the features' L2 norms (2 values);
- count: how many feature positions the class covered in its step's data (1 value, and one for the
  background), which sets how many fake features of the class a later step replays.

Nothing else is kept: no image, no feature map. The two D-vectors are stored in float16 (the
reference keeps float32): 2 x 256 x 2 + 3 x 4 = 1036 bytes per class at D = 256, within the
2 KB goal, where float32 would need 2060.

Fake features of class c are ``(prototype_c + noise_c * eps) * r`` with eps ~ N(0, I) and one
r ~ N(norm_mean_c, norm_std_c) per vector, the paper's (``trainer/trainer_voc.py`` 406-420 draws one
per element: ``ClassMemory.sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

STAR_MEMORY = "star_memory"
IGNORE = 255


def labels_at(labels: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour labels at the feature resolution: (B, H, W) -> (B, h, w).

    The reference samples the pixel in the middle of each output-stride cell (``label[:, 8::16, 8::16]``
    at stride 16); nearest interpolation picks one pixel per cell as well and handles odd sizes.
    """
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


@dataclass
class ClassMemory:
    """The stored statistics of ``K`` foreground classes (class ``k + 1`` in row ``k``).

    Attributes:
        prototypes: (K, D) unit vectors.
        noise: (K, D) per-dimension std of the normalised features around the prototype.
        norm_mean: (K,) mean L2 norm of the class's features.
        norm_std: (K,) std of those norms.
        counts: (K + 1,) feature positions per class in its step's data; index 0 = background.
    """

    prototypes: Tensor
    noise: Tensor
    norm_mean: Tensor
    norm_std: Tensor
    counts: Tensor

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def to_state(self) -> dict[str, Tensor]:
        """Tensors as kept in the model directory (the D-vectors in float16)."""
        return {
            "prototypes": self.prototypes.detach().half().cpu(),
            "noise": self.noise.detach().half().cpu(),
            "norm_mean": self.norm_mean.detach().float().cpu(),
            "norm_std": self.norm_std.detach().float().cpu(),
            "counts": self.counts.detach().float().cpu(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], device: torch.device) -> ClassMemory:
        return cls(*(state[name].float().to(device) for name in cls.__dataclass_fields__))

    def sample(self, per_class: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Fake features: ``per_class[k]`` of class ``k + 1`` -> (sum(per_class), D).

        The reference draws the norm independently for every element of the fake feature
        (``torch.randn_like`` of the whole (1, D, n, 1) tensor); the paper samples one norm per
        feature, which is what this does: a norm belongs to a vector, not to a dimension.
        """
        rows = torch.repeat_interleave(torch.arange(self.num_classes, device=per_class.device), per_class)
        eps = torch.randn(len(rows), self.prototypes.shape[1], device=rows.device, generator=generator)
        directions = self.prototypes[rows] + self.noise[rows] * eps  # (N, D)
        norms = self.norm_mean[rows] + self.norm_std[rows] * torch.randn(
            len(rows), device=rows.device, generator=generator
        )  # (N,)
        return directions * norms[:, None]


class MemoryBuilder:
    """Accumulates the statistics of some classes over batches in one pass (sums and squared sums).

    The reference makes two passes (prototypes, then the noise around them); with the per-class sums
    of the normalised features and of their squares, ``E[(f - p)^2] = E[f^2] - 2 p E[f] + p^2`` gives
    the same noise in one pass.

    Args:
        classes: Model indices of the classes to describe (foreground, in order).
        dim: Feature width D.
        device: Where the sums live.
    """

    def __init__(self, classes: list[int], dim: int, device: torch.device) -> None:
        self.classes = classes
        n = len(classes)
        self.sum = torch.zeros(n, dim, device=device, dtype=torch.float64)
        self.sum_sq = torch.zeros(n, dim, device=device, dtype=torch.float64)
        self.norm_sum = torch.zeros(n, device=device, dtype=torch.float64)
        self.norm_sum_sq = torch.zeros(n, device=device, dtype=torch.float64)
        self.count = torch.zeros(n, device=device, dtype=torch.float64)
        self.background = 0.0

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Adds one batch: features (B, D, h, w), labels (B, H, W) in model indices."""
        small = labels_at(labels, features.shape[2:])  # (B, h, w)
        feats = features.permute(0, 2, 3, 1).double()  # (B, h, w, D)
        self.background += float((small == 0).sum())
        for row, cls in enumerate(self.classes):
            selected = feats[small == cls]  # (n, D)
            if len(selected) == 0:
                continue
            norms = selected.norm(dim=1)  # (n,)
            unit = selected / norms.clamp_min(1e-12)[:, None]
            self.sum[row] += unit.sum(0)
            self.sum_sq[row] += (unit**2).sum(0)
            self.norm_sum[row] += norms.sum()
            self.norm_sum_sq[row] += (norms**2).sum()
            self.count[row] += len(selected)

    def build(self) -> ClassMemory:
        """The statistics of the accumulated classes (counts[0] = background positions seen).

        A class that never appeared keeps zeros and a count of 0: nothing of it is ever replayed.
        """
        n = self.count.clamp_min(1)[:, None]
        prototypes = F.normalize(self.sum, dim=1)  # (K, D)
        mean = self.sum / n
        variance = self.sum_sq / n - 2 * prototypes * mean + prototypes**2
        norm_mean = self.norm_sum / n[:, 0]
        # unbiased std of the norms, as torch.std in the reference (0 for a single position)
        norm_var = (self.norm_sum_sq - self.count * norm_mean**2) / (self.count - 1).clamp_min(1)
        return ClassMemory(
            prototypes.float(),
            variance.clamp_min(0).sqrt().float(),
            norm_mean.float(),
            norm_var.clamp_min(0).sqrt().float(),
            torch.cat([torch.tensor([self.background], device=n.device), self.count]).float(),
        )
