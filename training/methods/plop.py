"""PLOP: pseudo-labels and Local POD distillation as loss terms.

Paper: `PLOP: Learning without Forgetting for Continual Semantic Segmentation` (Douillard, Chen,
Dapogny, Cord; CVPR 2021) - https://arxiv.org/abs/2011.11390; code: arthurdouillard/CVPR2021_PLOP
(``train.py``: ``features_distillation``, ``_local_pod``, ``find_median``, the entropy pseudo-labels).

- ``PseudoLabelCrossEntropy``: cross-entropy where background pixels take the old model's argmax
  when its normalised entropy is below that class's median (floored at 0.001), and are ignored
  otherwise; each image's loss is scaled by its share of confident background pixels.
- ``LocalPOD``: Local POD between the old and new model on the four backbone stages, the
  embedding (factor 0.01) and the low-resolution logits (factor 0.0005, new-class logits summed
  into background), each scaled by sqrt(#classes / #new classes), averaged over the layers.

The classifier's new rows start from the background row (MiB's init, done by ``add_classes``).
Differences from the code: the cross-entropy averages over non-ignored pixels (PLOP: over all
pixels); entropies are normalised by log(C_old) and the median is interpolated properly (see
``PseudoLabelCrossEntropy``); POD windows split odd sizes without dropping rows or columns (PLOP's
``w // s`` windows drop the remainder and assume square maps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from training.methods.base import Batch, LossTerm, Method, StepContext

IGNORE = 255
SCALES = (1, 2, 4)


def window_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """Splits ``range(length)`` into ``parts`` contiguous windows covering every index.

    Window i is ``[i * length // parts, (i + 1) * length // parts)``, so odd sizes lose no row. When
    ``length < parts`` the windows would be empty; each is then widened to one index.
    """
    bounds = []
    for i in range(parts):
        start = min(i * length // parts, length - 1)
        bounds.append((start, max((i + 1) * length // parts, start + 1)))
    return bounds


def local_pod(x: Tensor, scales: Sequence[int] = SCALES) -> Tensor:
    """Local POD descriptor: width- and height-pooled means of every window at every scale.

    Args:
        x: (B, C, H, W) map (already squared by the caller).
        scales: At scale s the map is cut into s x s windows.

    Returns:
        (B, N) with N = C * sum_s s * (H + W) when H and W are multiples of every scale.
    """
    parts = []
    for s in scales:
        for r0, r1 in window_bounds(x.shape[2], s):
            for c0, c1 in window_bounds(x.shape[3], s):
                window = x[:, :, r0:r1, c0:c1]
                parts.append(window.mean(dim=3).flatten(1))  # width-pooled: (B, C * h)
                parts.append(window.mean(dim=2).flatten(1))  # height-pooled: (B, C * w)
    return torch.cat(parts, dim=1)


def pod_distance(old: Tensor, new: Tensor, scales: Sequence[int] = SCALES) -> Tensor:
    """L2 distance between the Local POD descriptors of the squared maps, mean over the batch."""
    return (local_pod(old.pow(2), scales) - local_pod(new.pow(2), scales)).norm(dim=1).mean()


def fold_new_into_background(logits: Tensor, num_old: int) -> Tensor:
    """PLOP's ``extra_channels: sum``: (B, C, h, w) -> (B, C_old, h, w), new logits added to background."""
    background = logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:num_old]], dim=1)


def normalized_entropy(probs: Tensor) -> Tensor:
    """Entropy over the class axis divided by log(C): (B, C, H, W) -> (B, H, W) in [0, 1]."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-8))).sum(dim=1)
    return entropy / math.log(max(probs.shape[1], 2))


def histogram_median(histograms: Tensor) -> Tensor:
    """Median of each row of (K, bins) counts over [0, 1], interpolated linearly inside its bin.

    Rows without counts give 0.
    """
    bins = histograms.shape[1]
    totals = histograms.sum(dim=1, keepdim=True).double()  # (K, 1)
    cumulative = histograms.cumsum(dim=1).double()  # (K, bins)
    half = totals / 2
    index = (cumulative < half).sum(dim=1, keepdim=True).clamp(max=bins - 1)  # first bin reaching half
    below = (cumulative - histograms.double()).gather(1, index)
    inside = histograms.double().gather(1, index).clamp_min(1)
    median = (index.double() + (half - below) / inside) / bins
    return torch.where(totals > 0, median, torch.zeros_like(median)).squeeze(1).float()


class PseudoLabelCrossEntropy(LossTerm):
    """Cross-entropy on PLOP's entropy-filtered pseudo-labels (plain cross-entropy at step 0).

    ``on_step_start`` runs the old model once over the step's data and sets, per old class c,
    ``threshold_c = max(median normalised entropy of background pixels predicted c, min_threshold)``
    (a 100-bin histogram, as PLOP). During training a background pixel (label < C_old) becomes the
    old argmax if its normalised entropy is below the threshold of that argmax, else ignored; new
    classes keep their labels. The per-pixel loss of an image is multiplied by
    ``#confident background / #background`` (1 without background: PLOP's
    ``classif_adaptive_factor``), then averaged over the non-ignored pixels of the batch, on the main
    and auxiliary logits.

    Entropy is normalised by log(C_old) (PLOP divides by C_old log C_old, then again by log C), and
    the histogram median is the textbook interpolation (PLOP's loop adds bin indices, not counts).
    """

    name = "plop_ce"
    classifies = True

    def __init__(self, weight: float = 1.0, min_threshold: float = 1e-3, bins: int = 100) -> None:
        super().__init__(weight)
        self.min_threshold = min_threshold
        self.bins = bins
        self.thresholds: Tensor | None = None  # (C_old,) of the current step

    @torch.no_grad()
    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.old_model is None:
            self.thresholds = None
            return
        histograms = torch.zeros(ctx.num_old_classes * self.bins, dtype=torch.long, device=ctx.device)
        for images, labels in ctx.train_loader:
            probs = torch.softmax(ctx.old_model(images.to(ctx.device)).float(), dim=1)  # (B, C_old, H, W)
            background = labels.to(ctx.device) < ctx.num_old_classes
            bin_index = (normalized_entropy(probs)[background] * self.bins).long().clamp(0, self.bins - 1)
            cells = probs.argmax(dim=1)[background] * self.bins + bin_index
            histograms += torch.bincount(cells, minlength=histograms.numel())
        medians = histogram_median(histograms.view(ctx.num_old_classes, self.bins))
        self.thresholds = medians.clamp_min(self.min_threshold)

    def pseudo_labels(self, labels: Tensor, old_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the training targets (B, H, W) and the per-image loss factor (B,)."""
        probs = torch.softmax(old_logits.float(), dim=1)  # (B, C_old, H, W)
        old_pred = probs.argmax(dim=1)  # (B, H, W)
        confident = normalized_entropy(probs) < self.thresholds[old_pred]
        background = labels < old_logits.shape[1]
        targets = torch.where(background, torch.where(confident, old_pred, IGNORE), labels)
        num_background = background.sum(dim=(1, 2))
        factor = (confident & background).sum(dim=(1, 2)) / num_background.clamp_min(1)
        return targets, torch.where(num_background > 0, factor, torch.ones_like(factor))

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        targets, factor = batch.labels, torch.ones(batch.labels.shape[0], device=batch.labels.device)
        if ctx.old_model is not None:
            targets, factor = self.pseudo_labels(batch.labels, batch.old_out.logits)
        valid = (targets != IGNORE).sum().clamp_min(1)

        def weighted_ce(logits: Tensor) -> Tensor:
            per_pixel = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # (B, H, W)
            return (per_pixel * factor[:, None, None]).sum() / valid

        return torch.stack(
            [weighted_ce(logits) for logits in [batch.out.logits, *batch.out.aux_logits]]
        ).sum()


class LocalPOD(LossTerm):
    """PLOP's Local POD on the backbone stages, the embedding and the low-resolution logits.

    Layer losses ``pod_distance(old, new)`` times ``feature_factor`` (four stages + embedding) or
    ``logits_factor`` (logits of the 1x1 classifier at the embedding's size, new-class logits
    summed into background), each multiplied by sqrt(#classes / #new classes) and the total divided
    by the number of layers. PLOP takes the stages before the last block's ReLU; BiSeNet exposes
    them after it.
    """

    name = "local_pod"
    needs_old_model = True

    def __init__(
        self,
        weight: float = 1.0,
        feature_factor: float = 0.01,
        logits_factor: float = 0.0005,
        scales: Sequence[int] = SCALES,
    ) -> None:
        super().__init__(weight)
        self.feature_factor = feature_factor
        self.logits_factor = logits_factor
        self.scales = tuple(scales)

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        out, old = batch.out, batch.old_out
        logits = ctx.model.head.classifier(out.features)  # (B, C, h, w)
        with torch.no_grad():
            old_logits = ctx.old_model.head.classifier(old.features)  # (B, C_old, h, w)
        pairs = [
            (o, n, self.feature_factor)
            for o, n in zip([*old.stages, old.features], [*out.stages, out.features], strict=True)
        ]
        pairs.append((old_logits, fold_new_into_background(logits, ctx.num_old_classes), self.logits_factor))
        schedule = math.sqrt(ctx.num_classes / (ctx.num_classes - ctx.num_old_classes))
        layers = [factor * pod_distance(o.float(), n.float(), self.scales) for o, n, factor in pairs]
        return torch.stack(layers).sum() * schedule / len(layers)


def plop(pod: float = 1.0, min_threshold: float = 1e-3) -> Method:
    """PLOP with the VOC defaults (POD factors 0.01 / 0.0005, entropy threshold floor 0.001)."""
    return Method("plop", [PseudoLabelCrossEntropy(min_threshold=min_threshold), LocalPOD(pod)])
