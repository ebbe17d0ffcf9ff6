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
The pseudo-label thresholds follow PLOP's code exactly, quirks included (``plop_entropy``,
``plop_histogram_median``): they keep far more background pixels than a textbook median of
entropies normalised to [0, 1] would. Differences from the code: POD windows split odd sizes
without dropping rows or columns (PLOP's ``w // s`` windows drop the remainder and assume square
maps); the cross-entropy also runs on BiSeNet's auxiliary heads; the new classifier rows train at
100x the step's lr (the trainer's default, see ``training.optim``) while PLOP trains everything at one
rate, at which the new class of a 1-class step is never predicted here (``LocalPOD.lr_multipliers``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from training.losses import cross_entropy_over_all_pixels
from training.methods.base import Batch, LossTerm, Method, StepContext, over_heads
from training.options import ParamGroup

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


def plop_entropy(probs: Tensor, num_classes: int) -> Tensor:
    """PLOP's normalised entropy of the old model's softmax: (B, C_old, H, W) -> (B, H, W).

    ``entropy(probs) / max_entropy`` as PLOP computes it: ``entropy`` (``train.py`` 701-713) is
    ``-mean_c(p log(p + 1e-8)) / log(C_old + 1e-8)``, i.e. H / (C_old log C_old), and ``max_entropy`` is
    ``log(nb_current_classes)`` = log of the step's class count, old and new (``train.py`` 37-40, 514
    and 256-257). Values therefore lie in [0, 1 / (C_old log C)], not [0, 1]: with 16 old classes and
    17 in all, below 0.022, i.e. in the first 3 of the 100 histogram bins.

    Args:
        probs: (B, C_old, H, W) softmax of the old model.
        num_classes: C, the step's classes (old and new).
    """
    entropy = -(probs * torch.log(probs + 1e-8)).mean(dim=1) / math.log(probs.shape[1] + 1e-8)
    return entropy / math.log(num_classes)


def plop_histogram_median(histograms: Tensor) -> Tensor:
    """PLOP's ``find_median`` estimate of each row of (K, bins) counts over [0, 1] (``train.py`` 556-573).

    The reference loop visits b = 0, 1, ... with ``lower_border = b / bins``, reads bin
    ``int(lower_border * bins)`` (which float rounding makes b - 1 for some b, e.g. 29 of 100), and
    grows its running sum by ``lower_border * bins`` - the bin's *index*, not its count. It stops at
    the first b with ``running <= half <= running + hist[bin]`` and returns
    ``lower_border + (half - running) / hist[bin] / bins``. With thousands of pixels per class that is
    the first bin holding about half of them; when no bin does, the loop ends on the last bin with
    the whole index sum as ``running``, and an empty last bin divides by zero: +inf (every pixel
    kept) or -inf (floored later). Rows without counts give 0, PLOP's initial value. Reproduced
    exactly here, as a vector, in float64 like Python's floats.
    """
    bins = histograms.shape[1]
    hist = histograms.double()  # (K, bins)
    half = hist.sum(dim=1, keepdim=True) / 2  # (K, 1)
    lower = torch.arange(bins, dtype=torch.float64, device=hist.device) / bins  # (bins,) lower_border
    read = (lower * bins).long()  # bin index the loop reads at each visit
    added = lower * bins  # what the running sum grows by after each visit
    running = torch.cat([added.new_zeros(1), added.cumsum(0)[:-1]])  # (bins,) before each visit
    stops = (half >= running) & (half <= running + hist[:, read])  # (K, bins)
    found = stops.any(dim=1, keepdim=True)
    visit = torch.where(found, stops.long().argmax(dim=1, keepdim=True), bins - 1)  # (K, 1)
    run = torch.where(found, running[visit], added.sum())
    median = lower[visit] + (half - run) / hist.gather(1, read[visit]) / bins
    return torch.where(half > 0, median, torch.zeros_like(median)).squeeze(1).float()


class PseudoLabelCrossEntropy(LossTerm):
    """Cross-entropy on PLOP's entropy-filtered pseudo-labels (plain cross-entropy at step 0).

    ``on_step_start`` (PLOP's ``before`` -> ``find_median``, ``train.py`` 173-183, 505-589) runs the
    old model once over the step's data, bins ``plop_entropy`` of the background pixels per predicted
    class into 100 bins and sets ``threshold_c = max(plop_histogram_median_c, min_threshold)``.
    During training (``train.py`` 252-293) a background pixel (label < C_old) becomes the old argmax
    if its ``plop_entropy`` is below the threshold of that argmax, else ignored; new classes keep
    their labels. The per-pixel loss of an image is multiplied by
    ``#confident background / (#background + 1e-6)`` (``classif_adaptive_factor``), then averaged over
    all pixels of the batch, ignored ones counting 0 (``train.py`` 351-352), on the main and
    auxiliary logits.
    """

    name = "plop_ce"
    classifies = True

    def __init__(self, weight: float = 1.0, min_threshold: float = 1e-3, bins: int = 100) -> None:
        super().__init__(weight)
        self.min_threshold = min_threshold
        self.bins = bins
        self.thresholds: Tensor | None = None  # (C_old,) of the current step
        self.num_classes = 0  # the step's classes, old and new (PLOP's nb_current_classes)

    @torch.no_grad()
    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.old_model is None:
            self.thresholds = None
            return
        self.num_classes = ctx.num_classes
        histograms = torch.zeros(ctx.num_old_classes * self.bins, dtype=torch.long, device=ctx.device)
        for images, labels in ctx.train_loader:
            probs = torch.softmax(ctx.old_model(images.to(ctx.device)).float(), dim=1)  # (B, C_old, H, W)
            background = labels.to(ctx.device) < ctx.num_old_classes
            values = plop_entropy(probs, self.num_classes)[background]
            bin_index = (values * self.bins).long().clamp(max=self.bins - 1)
            cells = probs.argmax(dim=1)[background] * self.bins + bin_index
            histograms += torch.bincount(cells, minlength=histograms.numel())
        medians = plop_histogram_median(histograms.view(ctx.num_old_classes, self.bins))
        # PLOP: thresholds[c] = max(thresholds[c], 0.001) (train.py 582-584); NaN stays NaN as there.
        self.thresholds = torch.where(medians < self.min_threshold, self.min_threshold, medians)

    def pseudo_labels(self, labels: Tensor, old_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the training targets (B, H, W) and the per-image loss factor (B,)."""
        if self.thresholds is None:
            raise RuntimeError("pseudo-labels need the thresholds that on_step_start sets after step 0")
        probs = torch.softmax(old_logits.float(), dim=1)  # (B, C_old, H, W)
        old_pred = probs.argmax(dim=1)  # (B, H, W)
        confident = plop_entropy(probs, self.num_classes) < self.thresholds[old_pred]
        background = labels < old_logits.shape[1]
        targets = torch.where(background, torch.where(confident, old_pred, IGNORE), labels)
        factor = (confident & background).sum(dim=(1, 2)) / (background.sum(dim=(1, 2)) + 1e-6)
        return targets, factor

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        if ctx.old_model is None:
            return over_heads(batch, lambda logits: cross_entropy_over_all_pixels(logits, batch.labels))
        targets, factor = self.pseudo_labels(batch.labels, batch.require_old_out().logits)

        def weighted_ce(logits: Tensor) -> Tensor:
            per_pixel = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # (B, H, W)
            return (per_pixel * factor[:, None, None]).mean()

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
    # The heads and the old classifier rows stay at the step's lr (PLOP's code trains every parameter
    # at one rate); only the new rows keep the trainer's 100x, which they need to win any pixel. POD
    # holds the heads' features to the old model's, and at the trainer's 10x they drifted faster than
    # it pulled them back (BENCHMARKS.md "Why PLOP got worse: the heads' 10x learning rate").
    lr_multipliers: Mapping[ParamGroup, float] = {ParamGroup.HEAD: 1.0, ParamGroup.CLASSIFIER: 1.0}

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
        out, old = batch.out, batch.require_old_out()
        logits = ctx.model.head.classifier(out.features)  # (B, C, h, w)
        with torch.no_grad():
            old_logits = ctx.require_old_model().head.classifier(old.features)  # (B, C_old, h, w)
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
