"""WILSON's weak supervision: new classes learnt from image-level labels (Cermelli et al., CVPR 2022).

Reference read line by line: fcdl94/WILSON (``train.py`` 60-70, 120-126, 218-290, ``wss/single_stage.py``
``pseudo_gtmask`` 18-40 and ``balanced_mask_loss_ce`` 43-79, ``utils/wss_loss.py`` ``ngwp_focal`` 5-20,
``bce_loss`` 34-51, ``binarize`` 186-188, defaults of ``argparser.py`` 145-189 and ``run.sh`` for VOC
15-5). "W x:n" below cites those files. ``WeakLabels`` is one loss term that any method whose step has
image-level labels gets (``with_weak_labels``); it is used with ``star`` and ``mib``.

What WILSON does, and what this term does the same way:
- A localizer (W train.py:65-69: conv3x3-BN-LeakyReLU, conv3x3-BN-LeakyReLU, conv1x1 to every class
  of the step, background included) on the encoder's features, trained online in the step, with its
  own learning rate (W ``lr_pseudo`` 0.01 = 10x the step's 0.001, W train.py:124-125), discarded after
  the step (nothing of it is saved).
- Image classification from the maps (``ngwp_focal``: normalised global weighted pooling plus a focal
  penalty; W wss_loss.py:5-20), BCE against the image labels of the new classes (``bce_loss`` with
  ``mode='ngwp'``, ``reduction='mean'``, W train.py:231-232).
- The localizer's old channels learn the old model's probabilities (BCE, W train.py:233-235).
- From ``pseudo_ep`` on (W argparser.py:179, 5 of run.sh's 40 epochs): the localizer's softmax (eval
  mode, detached; W train.py:222-223), its channels of classes the image does not show zeroed (W 254;
  the image labels of old classes are 0, W dataset/dataset.py ``LabelSelection``, so every old channel
  is zeroed), is binarised to its argmax and mixed with the soft map, ``alpha`` 0.5 of the hard map
  (W 260-262, argparser.py:173); the target of the model is the old model's probabilities on the old
  classes, this mix on the new ones, and on background the smaller of the old model's background and
  the mix's (W 271-275, ``icarl_bkg`` -1); images whose mix misses a labelled new class weigh 0
  (W 264-268); the model's loss is the BCE against this target, summed over classes, mean over pixels,
  mean over the images that count (``l_seg`` 1, W 280-282).
- The localizer trains on its own thresholded maps too (``pseudo_gtmask`` with top 0.6, background 0.7,
  low 0.2 and ambiguous pixels dropped, W 257-258; ``balanced_mask_loss_ce``, W 284).

How the term fits this project's methods (deviations, each on purpose):
- Features: BiSeNet's embedding at 1/8 (``SegmentationOutput.features``, what the classifier reads),
  not the backbone's last stage as WILSON's ``features['body']`` (its DeepLab runs at output stride 16,
  so ``body`` is at 1/16 and feeds the segmentation head). BiSeNet's backbone output is at 1/32: 3x3
  cells for a 96 px crop, too coarse to localise anything; the embedding keeps BiSeNet's spatial path
  at 1/8 and is the input of its classifier, the role ``body`` has for WILSON's head. Its gradient
  reaches the encoder, as in WILSON (the features are not detached).
- Localizer width: the embedding's width (WILSON 256 on a 2048-wide body).
- ``pseudo_ep`` as a fraction of the step's iterations (``pseudo_start``; 0.125 = 5/40 is WILSON's
  share), because the steps here have a floor of iterations rather than WILSON's 40 epochs; 0 by
  default, as the warm-up below trains the localizer before the step.
- The old model's probabilities: WILSON's base model is trained with per-class BCE, and it takes
  ``sigmoid(outputs_old)``. A ``star`` model is such a model (per-class sigmoids; its background,
  which it does not output, is 1 - the largest class sigmoid, its argmax rule); a softmax model
  (``mib``) gives its softmax.
- The model's loss on the target: for a sigmoid model WILSON's BCE over the classes 1.. (channel 0 is
  the constant 0 of ``sigmoid_outputs``); for a softmax model the cross-entropy against the target
  normalised to sum 1 per pixel (the BCE of a softmax's logits would train logits no softmax reads).
  The target is computed at the embedding's resolution (WILSON: at its outputs' 1/16) and upsampled
  bilinearly to the logits' size.
- ``old_wins`` (default on): no new class in the target where the old model's most probable class is
  an old foreground class. WILSON's target keeps the localizer's new classes there (its channels of
  old classes are zeroed before the argmax, so an old object's pixel may be binarised to a new
  class); its per-class BCE then trains both independently, but a softmax model must share one
  distribution between them, and the old class lost (measured in BENCHMARKS.md, "Weak supervision").
- The encoder MSE of WILSON's run.sh (``loss_de`` 1, W train.py:238-239, on the backbone's output) is
  added by ``with_weak_labels`` as ILT's term (``standard.EncoderDistillation``, the same MSE).
- The method's own losses stay: WILSON trains ``l_seg`` and the encoder MSE only; here
  the images without a mask get the argmax of the target (old classes as background, the training
  labels' convention) as their labels, so that the method's classification loss, distillation regions
  and end-of-step hooks (``star``'s new-class statistics) read pseudo-labels where there is no mask;
  before ``pseudo_start`` those pixels are 255 (ignored by ``mib``; ``star``'s BCE counts 255 as a
  negative of every class, as STAR's code does, and its replay plan, made at the step's start, finds no
  old class in them). Images with a mask keep it and add only the localizer's losses (their image
  labels come from the mask).
- PAMR (W ``--affinity`` in run.sh, W wss/modules.py:121-150, ``pamr``) is ported; WILSON refines only
  the localizer's own targets with it, at the maps' resolution (W train.py:249-258). Here
  (``refine_iterations`` 30, WILSON 10) it refines the background and new-class maps that make the
  model's target, on the image resized to at most 128 px a side (the target is then built there): the
  embedding is at 1/8, and a map upsampled from it cannot follow object edges. Then ``cutoff`` (0.7,
  the share of its peak below which WILSON's ``pseudo_gtmask`` drops a background pixel) gives a new
  class only the pixels where its map reaches 0.7 of its peak over the image, the rest to background:
  the localizer's maps spread over the background around an object (measured: about half of the
  pixels a warmed-up localizer gives a new class are background).
- ``warmup_iterations`` (not WILSON's): the localizer trains alone before the step on the frozen old
  model's embedding of the step's images, with the image-label and old-channel losses. WILSON's
  localizer has about 450 iterations (5 epochs of VOC 15-5) before its pseudo-labels are used; a step
  here has a floor of 100-200 iterations in all, so its pseudo-labels began from a barely trained head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data.dataset import WeakItem
from training.methods.base import Batch, LossTerm, Method, StepContext
from training.methods.standard import EncoderDistillation
from training.models.bisenet import BiSeNet

IGNORE = 255
PSEUDO_LABELS_KEY = "pseudo_labels"  # the step's metrics key of the pseudo-labels' statistics
WARMUP_CACHE_BYTES = 256 * 2**20  # the localizer's warm-up keeps at most this much of the embedding
REFINE_MAX_SIDE = 128  # PAMR refines the maps on the image resized to at most this many pixels a side


class Localizer(nn.Sequential):
    """WILSON's pseudo-labeler (W train.py:65-69): (B, D, h, w) features -> (B, C, h, w) class maps.

    Args:
        in_channels: D, the embedding's width.
        num_classes: C, every class of the step, background included.
        hidden: Width of the two 3x3 convolutions (default: ``in_channels``; WILSON 256).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int | None = None) -> None:
        width = hidden or in_channels
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.01),  # WILSON's norm is ABN with leaky_relu 0.01 (segmentation_module.get_norm)
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.01),
            nn.Conv2d(width, num_classes, 1),
        )


def ngwp_focal(maps: Tensor) -> Tensor:
    """Image scores from class maps (W wss_loss.py:5-20, focal, ``lam`` 0.01): (B, C, h, w) -> (B, C).

    y_c = sum_p z_cp m_cp / (1 + sum_p m_cp) + (1 - mean_p m_cp)^3 log(0.01 + mean_p m_cp), m = softmax_c(z).
    """
    masks = maps.softmax(dim=1).flatten(2)  # (B, C, hw)
    logits = maps.flatten(2)
    pooled = (logits * masks).sum(-1) / (1.0 + masks.sum(-1))
    mean = masks.mean(-1)
    return pooled + (1 - mean).pow(3) * torch.log(0.01 + mean)


def image_label_loss(maps: Tensor, labels: Tensor) -> Tensor:
    """``bce_loss(maps, labels, mode='ngwp', reduction='mean')`` (W wss_loss.py:34-51): the scores of the
    last ``labels.shape[1]`` channels against the multi-hot ``labels`` (B, N), BCE mean -> scalar."""
    scores = ngwp_focal(maps)[:, -labels.shape[1] :]
    return F.binary_cross_entropy_with_logits(scores, labels)


def binarize(maps: Tensor) -> Tensor:
    """1 where a channel holds the pixel's maximum (ties: each such channel), else 0 (W wss_loss.py:186)."""
    return (maps >= maps.max(dim=1, keepdim=True)[0]).type_as(maps)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """x's values at (y + dy, x + dx), edges replicated: (B, K, H, W) -> same."""
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, [pad] * 4, mode="replicate")
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def pamr(
    image: Tensor, masks: Tensor, iterations: int = 10, dilations: tuple[int, ...] = (1, 2, 4, 8, 12)
) -> Tensor:
    """Pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020; W wss/modules.py:121-150, with
    W train.py:60's ``num_iter=10, dilations=[1, 2, 4, 8, 12]``).

    Each pixel's masks become, ``iterations`` times, the weighted mean of its 8 neighbours' at every
    dilation, weights softmax_q(-mean_k |x_kp - x_kq| / (1e-8 + 0.1 std_k)) over those neighbours q, std_k
    the (unbiased) deviation of channel k over the pixel and its neighbours at every dilation.

    Args:
        image: (B, K, H, W) image (any scale; the weights divide by its local deviation).
        masks: (B, C, h, w) maps, upsampled (bilinear, corners aligned) to (H, W) first.
    Returns:
        (B, C, H, W) refined maps.
    """
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]
    around = torch.stack([_shifted(image, dy, dx) for dy, dx in offsets], dim=2)  # (B, K, P, H, W)
    centres = image[:, :, None].expand(-1, -1, len(dilations), -1, -1)  # the centre of each dilation's 3x3
    spread = torch.cat([around, centres], dim=2).std(dim=2, keepdim=True)  # (B, K, 1, H, W)
    distance = -(around - image[:, :, None]).abs() / (1e-8 + 0.1 * spread)
    weights = distance.mean(dim=1).softmax(dim=1)  # (B, P, H, W)
    reach, (h, w) = max(dilations), masks.shape[-2:]
    for _ in range(iterations):
        padded = F.pad(masks, [reach] * 4, mode="replicate")
        refined = torch.zeros_like(masks)  # (B, C, H, W); one shift at a time keeps memory at the masks' size
        for p, (dy, dx) in enumerate(offsets):
            shifted = padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w]
            refined.addcmul_(weights[:, p : p + 1], shifted)
        masks = refined
    return masks


def pseudo_gtmask(
    maps: Tensor, cutoff_top: float = 0.6, cutoff_bkg: float = 0.7, cutoff_low: float = 0.2
) -> Tensor:
    """Binary masks of confident pixels (W single_stage.py:18-40, ``ambiguous=True``; W train.py:257 cutoffs).

    A pixel is class c's when its map exceeds max(cutoff * max of c's map over the image, cutoff_low)
    (cutoff_bkg for channel 0, cutoff_top for the others); pixels claimed by two classes are dropped.
    maps (B, C, h, w) probabilities -> (B, C, h, w) in {0, 1}.
    """
    b, c, h, w = maps.shape
    flat = maps.reshape(b, c, -1)
    peak = flat.max(-1, keepdim=True)[0].clone()  # (B, C, 1)
    peak[:, :1] *= cutoff_bkg
    peak[:, 1:] *= cutoff_top
    peak = peak.clamp(min=cutoff_low)
    chosen = (flat > peak).type_as(maps)
    ambiguous = (chosen.sum(1, keepdim=True) > 1).type_as(maps)
    return ((1 - ambiguous) * chosen).reshape(b, c, h, w)


def balanced_mask_loss_ce(maps: Tensor, pseudo_gt: Tensor, image_labels: Tensor) -> Tensor:
    """The localizer's self-training loss (W single_stage.py:43-79) -> scalar.

    Cross-entropy of ``maps`` (B, C, h, w) against the argmax of ``pseudo_gt`` (B, C, h, w) in {0, 1}
    (pixels with no 1 ignored), each pixel weighted by (pixels of the image - pixels of its class) /
    (1 + pixels of the image); mean over pixels; an image counts only when its pseudo-mask holds as
    many classes as its labels (B, C - 1) plus background.
    """
    maps = F.interpolate(maps, size=pseudo_gt.shape[-2:], mode="bilinear", align_corners=True)
    target = pseudo_gt.argmax(1)  # (B, h, w)
    target[pseudo_gt.sum(1) < 1.0] = IGNORE
    b, c = pseudo_gt.shape[:2]
    per_class = pseudo_gt.reshape(b, c, -1).sum(-1)  # (B, C)
    total = per_class.sum(-1, keepdim=True)  # (B, 1)
    class_weight = (total - per_class) / (1 + total)  # (B, C)
    pixel_weight = (pseudo_gt * class_weight[:, :, None, None]).sum(1).reshape(b, -1)  # (B, hw)
    loss = F.cross_entropy(maps, target, ignore_index=IGNORE, reduction="none").reshape(b, -1)
    expected = image_labels.sum(-1).type_as(loss) + 1
    found = (per_class > 0).type_as(loss).sum(-1)
    image_weight = (expected == found).type_as(loss)  # (B,)
    return (image_weight * (pixel_weight * loss).mean(-1)).mean()


def old_probabilities(old_logits: Tensor, sigmoid_outputs: bool) -> Tensor:
    """The old model's per-class probabilities: (B, C_old, h, w) logits -> same shape in [0, 1].

    A sigmoid model (``BiSeNetConfig.sigmoid_outputs``): sigmoid of classes 1.., background 1 - their
    maximum. A softmax model: its softmax.
    """
    if not sigmoid_outputs:
        return old_logits.softmax(dim=1)
    classes = old_logits[:, 1:].sigmoid()
    background = 1 - classes.max(dim=1, keepdim=True)[0] if classes.shape[1] else torch.ones_like(old_logits)
    return torch.cat([background, classes], dim=1)


@dataclasses.dataclass(frozen=True)
class Target:
    """WILSON's target for the model (W train.py:252-275) and what it is made of.

    Attributes:
        target: (B, C, h, w) old probabilities on old classes, the hard/soft mix on new ones, the
            minimum of both on background.
        image_weight: (B,) 1 when every labelled new class (and no other) is in the mix (W 264-268).
        masked: (B, C, h, w) the localizer's softmax with channels of classes the image lacks zeroed
            (W 254), from which ``pseudo_gtmask`` makes the localizer's own targets.
    """

    target: Tensor
    image_weight: Tensor
    masked: Tensor


def assemble_target(
    probabilities: Tensor,
    image_labels: Tensor,
    old: Tensor,
    alpha: float,
    num_old: int,
    old_wins: bool = False,
    cutoff: float = 0.0,
) -> Target:
    """Builds WILSON's target from the localizer's softmax and the old model's probabilities.

    Args:
        probabilities: (B, C, h, w) softmax of the localizer (eval mode, detached).
        image_labels: (B, C) multi-hot over the step's classes, 0 for background and old classes.
        old: (B, C_old, h, w) the old model's probabilities (``old_probabilities``).
        alpha: Share of the hard (argmax) map in the mix (W 0.5).
        num_old: C_old, background included.
        old_wins: Zero the new classes' mix where the old model's most probable class is an old
            foreground class (not WILSON's; see the module docstring).
        cutoff: Each new class's masked map is zeroed where it is below ``cutoff`` x its maximum over
            the image, its mass moved to background (not WILSON's; 0: none).
    """
    masked = probabilities.clone()
    masked[:, 1:] *= image_labels[:, 1:, None, None]
    if cutoff > 0:
        new = masked[:, num_old:]
        peak = new.flatten(2).max(-1)[0][:, :, None, None]  # (B, C_new, 1, 1)
        dropped = new * (new < cutoff * peak).type_as(new)
        masked[:, num_old:] = new - dropped
        masked[:, 0] += dropped.sum(1)
    mixed = alpha * binarize(masked) + (1 - alpha) * masked
    if old_wins:
        mixed[:, num_old:] *= (old.argmax(1, keepdim=True) == 0).type_as(mixed)
    present = mixed.flatten(2).sum(-1)[:, num_old:] > 0  # (B, C_new)
    image_weight = (present == image_labels[:, num_old:].bool()).all(dim=1).type_as(mixed)
    target = torch.cat([old, mixed[:, num_old:]], dim=1)
    target[:, 0] = torch.minimum(target[:, 0], mixed[:, 0])
    return Target(target, image_weight, masked)


def segmentation_loss(logits: Tensor, target: Tensor, image_weight: Tensor, sigmoid_outputs: bool) -> Tensor:
    """The model's loss on WILSON's target (W train.py:280-282, ``l_seg`` weight applied by the caller).

    Per pixel: a sigmoid model, BCE summed over classes 1..; a softmax model, cross-entropy against the
    target normalised per pixel. Mean over each image's pixels, then the ``image_weight``-weighted mean
    over images (+1e-5 in the denominator, as WILSON). logits and target (B, C, H, W) -> scalar.
    """
    if sigmoid_outputs:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 1:], target[:, 1:], reduction="none").sum(1)
    else:
        distribution = target / target.sum(1, keepdim=True).clamp(min=1e-8)
        per_pixel = -(distribution * logits.log_softmax(dim=1)).sum(1)
    per_image = per_pixel.flatten(1).mean(-1)  # (B,)
    return (image_weight * per_image).sum() / (image_weight.sum() + 1e-5)


@dataclasses.dataclass
class _Iteration:
    """What ``prepare`` computed for the current batch, read by ``__call__``."""

    maps: Tensor  # (B, C, h, w) localizer logits, train mode (with gradient)
    old: Tensor  # (B, C_old, h, w) old model's probabilities
    built: Target | None  # None before pseudo_start


class WeakLabels(LossTerm):
    """WILSON's localizer and pseudo-labels as one loss term (module docstring).

    The loss = BCE of the image scores on the new classes' labels + BCE of the old channels on the old
    model + (from ``pseudo_start``) the localizer's balanced self-training CE + ``l_seg`` x the model's
    loss on the target, this last over the images without a mask only.

    Args:
        alpha: Share of the hard map in the target (W 0.5).
        pseudo_start: Fraction of the step's iterations before the pseudo-labels are used (W 5/40 epochs;
            0 here, the warm-up trains the localizer before the step instead).
        l_seg: Weight of the model's loss on the target (W 1).
        localizer_lr: The localizer's learning rate as a multiple of the step's (W 0.01 / 0.001 = 10).
        hidden: Width of the localizer (default: the embedding's).
        old_wins: No new class in the target where the old model's most probable class is an old
            foreground class (module docstring; False: WILSON's target).
        warmup_iterations: Iterations of the localizer alone before the step, on the frozen old model's
            embedding of the step's images (module docstring; 0: none, as WILSON; 500 chosen by
            measurement, BENCHMARKS.md "Weak supervision").
        warmup_lr: The warm-up's learning rate (SGD, momentum 0.9; WILSON's ``lr_pseudo`` 0.01).
        refine_iterations: PAMR iterations that refine the localizer's background and new-class maps on
            the image (resized to at most ``REFINE_MAX_SIDE`` a side) before they make the model's
            target (module docstring; 0: none, as WILSON, which refines only the localizer's own
            targets; 30 chosen by measurement).
        cutoff: A new class keeps a pixel only where its map reaches ``cutoff`` x its peak over the
            image; the rest goes to background (module docstring; 0: WILSON; 0.7 chosen by measurement,
            WILSON's own cutoff for its localizer's background targets).
    """

    name = "wilson"
    needs_old_model = True
    needs_image_labels = True

    def __init__(
        self,
        alpha: float = 0.5,
        pseudo_start: float = 0.0,
        l_seg: float = 1.0,
        localizer_lr: float = 10.0,
        hidden: int | None = None,
        old_wins: bool = True,
        warmup_iterations: int = 500,
        warmup_lr: float = 0.01,
        refine_iterations: int = 30,
        cutoff: float = 0.7,
    ) -> None:
        super().__init__(1.0)
        if not 0 <= alpha <= 1 or not 0 <= pseudo_start <= 1:
            raise ValueError(f"alpha and pseudo_start must lie in [0, 1], got {alpha}, {pseudo_start}")
        if warmup_iterations < 0 or refine_iterations < 0:
            raise ValueError(
                f"warmup_iterations and refine_iterations must be >= 0, got {warmup_iterations}, "
                f"{refine_iterations}"
            )
        if not 0 <= cutoff < 1:
            raise ValueError(f"cutoff must lie in [0, 1), got {cutoff}")
        self.alpha, self.pseudo_start, self.l_seg = alpha, pseudo_start, l_seg
        self.localizer_lr, self.hidden, self.old_wins = localizer_lr, hidden, old_wins
        self.warmup_iterations, self.warmup_lr = warmup_iterations, warmup_lr
        self.refine_iterations, self.cutoff = refine_iterations, cutoff
        self.localizer: Localizer | None = None
        self._current: _Iteration | None = None
        self._stats = PseudoLabelStats(0)

    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.old_model is None:
            raise ValueError("step 0 needs masks: image-level labels only train the classes of later steps")
        self.localizer = Localizer(ctx.model.embed_dim, ctx.num_classes, self.hidden).to(ctx.device)
        self._stats = PseudoLabelStats(ctx.num_classes)
        if self.warmup_iterations and ctx.weak_batches is not None:
            self.warm_up(ctx.weak_batches, ctx.require_old_model(), ctx.num_old_classes, ctx.device)

    def warm_up(
        self, batches: Iterable[WeakItem], old_model: BiSeNet, num_old: int, device: torch.device
    ) -> list[float]:
        """Trains the localizer alone for ``warmup_iterations`` on the frozen old model's embedding.

        The embedding and the old model's probabilities of one pass over ``batches`` are kept (at most
        ``WARMUP_CACHE_BYTES`` of them) and cycled through; the losses are the step's image-label BCE on
        the new classes and BCE of the old channels on the old model (W train.py:229-235).

        Returns:
            The loss of each warm-up iteration.
        """
        localizer = self.require_localizer()
        cached: list[tuple[Tensor, Tensor, Tensor]] = []  # (features, old probabilities, new image labels)
        size = 0
        with torch.no_grad():
            for item in batches:
                features = old_model.forward_features(item.image.to(device))  # (B, D, h, w)
                old = old_probabilities(old_model.classify(features), old_model.config.sigmoid_outputs)
                cached.append((features, old, item.image_labels.to(device)[:, num_old:]))
                size += (features.numel() + old.numel()) * features.element_size()
                if size >= WARMUP_CACHE_BYTES:
                    break
        parameters = localizer.parameters()
        optimizer = torch.optim.SGD(parameters, lr=self.warmup_lr, momentum=0.9, weight_decay=1e-4)
        localizer.train()
        losses = []
        for iteration in range(self.warmup_iterations):
            features, old, labels = cached[iteration % len(cached)]
            maps = localizer(features)  # (B, C, h, w)
            loss = image_label_loss(maps, labels) + F.binary_cross_entropy_with_logits(maps[:, :num_old], old)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    def trainable_modules(self) -> list[tuple[nn.Module, float]]:
        return [] if self.localizer is None else [(self.localizer, self.localizer_lr)]

    def require_localizer(self) -> Localizer:
        if self.localizer is None:
            raise ValueError("the localizer is built by on_step_start; run the step first")
        return self.localizer

    def pseudo_labels_on(self, ctx: StepContext) -> bool:
        return ctx.iteration >= self.pseudo_start * ctx.total_iterations

    def build_target(
        self, images: Tensor, features: Tensor, old_logits: Tensor, image_labels: Tensor, old_model: BiSeNet
    ) -> tuple[Tensor, Target]:
        """The localizer's eval-mode softmax and WILSON's target from it (W 222-275).

        Args:
            images: (B, 3, H, W) the batch (read with ``refine_iterations``: the target is then at (H, W)).
            features: (B, D, h, w) the model's embedding.
            old_logits: (B, C_old, h, w) the old model's logits at the embedding's resolution.
            image_labels: (B, C) multi-hot.
            old_model: For its output kind (``sigmoid_outputs``).
        """
        localizer = self.require_localizer()
        was_training = localizer.training
        localizer.eval()
        with torch.no_grad():
            probabilities = localizer(features).softmax(dim=1)  # (B, C, h, w)
        localizer.train(was_training)
        old = old_probabilities(old_logits, old_model.config.sigmoid_outputs)
        num_old = old.shape[1]
        if self.refine_iterations:
            # only background and the new classes reach the target (the old channels are zeroed by the
            # image labels), and PAMR refines each channel on its own
            kept = torch.cat([probabilities[:, :1], probabilities[:, num_old:]], dim=1)
            height, width = images.shape[-2:]
            scale = min(1.0, REFINE_MAX_SIDE / max(height, width))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            small = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            kept = pamr(small, kept, self.refine_iterations)  # (B, 1 + C_new, *size)
            probabilities = torch.zeros(
                kept.shape[0], probabilities.shape[1], *kept.shape[-2:], dtype=kept.dtype, device=kept.device
            )
            probabilities[:, :1], probabilities[:, num_old:] = kept[:, :1], kept[:, 1:]
            old = F.interpolate(old, size=size, mode="bilinear", align_corners=False)
        built = assemble_target(
            probabilities, image_labels, old, self.alpha, num_old, self.old_wins, self.cutoff
        )
        return probabilities, built

    def _pseudo_labelled(
        self, batch: Batch, ctx: StepContext, old_logits: Tensor
    ) -> tuple[Tensor, Target | None]:
        """The labels with the weak images' pseudo-labels (from ``pseudo_start``; before: as given).

        Args:
            old_logits: (B, C_old, h, w) the old model's logits at the embedding's resolution.
        """
        image_labels, weak = _require_image_labels(batch)
        if not self.pseudo_labels_on(ctx):
            return batch.labels, None
        features = batch.out.features.detach()
        _, built = self.build_target(
            batch.images, features, old_logits, image_labels, ctx.require_old_model()
        )
        hard = hard_labels(built.target, ctx.num_old_classes, batch.labels.shape[-2:])  # (B, H, W)
        return torch.where(weak[:, None, None], hard, batch.labels), built

    def hook_labels(self, batch: Batch, ctx: StepContext) -> Tensor:
        old_logits = ctx.require_old_model().classify(batch.require_old_out().features)
        return self._pseudo_labelled(batch, ctx, old_logits)[0]

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """Runs the localizer; from ``pseudo_start`` writes pseudo-labels into the weak images' labels."""
        image_labels, weak = _require_image_labels(batch)
        old_model = ctx.require_old_model()
        old_logits = old_model.classify(batch.require_old_out().features)  # (B, C_old, h, w)
        maps = self.require_localizer()(batch.out.features)  # (B, C, h, w), train mode
        labels, built = self._pseudo_labelled(batch, ctx, old_logits)  # one classify of the old model
        if built is not None:
            self._stats.update(labels[weak], image_labels[weak], built.image_weight[weak])
        old = old_probabilities(old_logits, old_model.config.sigmoid_outputs)
        self._current = _Iteration(maps, old, built)
        return dataclasses.replace(batch, labels=labels)

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        current = self._current
        image_labels, weak = _require_image_labels(batch)
        if current is None:
            raise ValueError("WeakLabels.prepare must run before the loss (Method.losses does)")
        num_old = ctx.num_old_classes
        built = current.built
        loss = image_label_loss(current.maps, image_labels[:, num_old:])
        loss = loss + F.binary_cross_entropy_with_logits(current.maps[:, :num_old], current.old)
        if built is not None:
            loss = loss + balanced_mask_loss_ce(
                current.maps, pseudo_gtmask(built.masked), image_labels[:, 1:]
            )
            if weak.any():
                size = batch.out.logits.shape[-2:]
                target = F.interpolate(built.target[weak], size=size, mode="bilinear", align_corners=False)
                loss = loss + self.l_seg * segmentation_loss(
                    batch.out.logits[weak], target, built.image_weight[weak], ctx.model.config.sigmoid_outputs
                )
        self._current = None
        return loss

    def step_metrics(self) -> dict[str, Any]:
        return {PSEUDO_LABELS_KEY: self._stats.summary()}

    @torch.no_grad()
    def label_images(
        self, model: BiSeNet, old_model: BiSeNet, images: Tensor, image_labels: Tensor
    ) -> Tensor:
        """The pseudo-labels the step's end state gives (B, 3, H, W) images: -> (B, H, W) training labels."""
        model.eval()
        features = model.forward_features(images)
        old_logits = old_model.classify(old_model.forward_features(images))
        _, built = self.build_target(images, features, old_logits, image_labels, old_model)
        return hard_labels(built.target, old_logits.shape[1], images.shape[-2:])


def hard_labels(target: Tensor, num_old: int, size: tuple[int, ...] | torch.Size) -> Tensor:
    """The argmax of the target at ``size``, old classes as background (training labels): -> (B, *size)."""
    upsampled = F.interpolate(target, size=tuple(size), mode="bilinear", align_corners=False)
    labels = upsampled.argmax(1)
    return torch.where(labels < num_old, torch.zeros_like(labels), labels)


def _require_image_labels(batch: Batch) -> tuple[Tensor, Tensor]:
    if batch.image_labels is None or batch.weak is None:
        raise ValueError("WeakLabels needs image-level labels: train on a WeakSegmentationDataset")
    return batch.image_labels, batch.weak


class PseudoLabelStats:
    """Statistics of the pseudo-labels of the images without a mask, over the step's iterations since
    ``pseudo_start`` (what a step without validation masks reports instead of mIoU).

    Args:
        num_classes: C, background included.
    """

    def __init__(self, num_classes: int) -> None:
        self.pixels = torch.zeros(num_classes, dtype=torch.float64)  # (C,) pseudo-labelled pixels per class
        self.images = 0
        self.complete = 0.0  # images whose mix holds exactly their labelled new classes (W's weight)
        self.found = 0  # labelled (image, class) pairs with at least one pixel of the class
        self.labelled = 0  # labelled (image, class) pairs

    def update(self, labels: Tensor, image_labels: Tensor, image_weight: Tensor) -> None:
        """Adds a batch: labels (N, H, W), image_labels (N, C), image_weight (N,)."""
        if len(labels) == 0:
            return
        self.pixels += torch.bincount(labels.flatten().cpu(), minlength=len(self.pixels)).double()
        self.images += len(labels)
        self.complete += float(image_weight.sum())
        shown = F.one_hot(labels.flatten(1), len(self.pixels)).amax(1).float().cpu()  # (N, C)
        wanted = image_labels.cpu().bool()
        self.found += int((shown.bool() & wanted).sum())
        self.labelled += int(wanted.sum())

    def summary(self) -> dict[str, Any]:
        """The figures: images seen, share of images WILSON's weight keeps, share of labelled classes
        that got pixels, and each class's share of the pseudo-labelled pixels (by model index)."""
        total = float(self.pixels.sum())
        return {
            "note": "pseudo-labels of the training images without masks, since pseudo_start",
            "images": self.images,
            "complete_fraction": self.complete / self.images if self.images else None,
            "labelled_classes_found": self.found / self.labelled if self.labelled else None,
            "pixel_fraction": [float(p) / total for p in self.pixels] if total else None,
        }


def with_weak_labels(method: Method, term: WeakLabels | None = None, encoder_kd: float = 1.0) -> Method:
    """``method`` with the ``WeakLabels`` term first (its ``prepare`` writes the labels the others read)
    and WILSON's encoder distillation (``loss_de`` 1 in run.sh: ILT's MSE on the backbone's output,
    ``standard.EncoderDistillation``) unless the method has one or ``encoder_kd`` is 0.

    Raises:
        ValueError: For a method whose classification the weak term cannot feed (one trained in a
            single step over every class).
    """
    if method.trains_all_classes_at_once:
        raise ValueError(f"{method.name} trains every class at once; image-level labels need an old model")
    terms: list[LossTerm] = [term or WeakLabels(), *method.terms]
    if encoder_kd > 0 and not any(isinstance(t, EncoderDistillation) for t in method.terms):
        terms.append(EncoderDistillation(encoder_kd))
    return dataclasses.replace(method, terms=terms)
