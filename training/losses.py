"""Loss functions of the class-incremental methods, as the reference repositories define them.

Shapes: logits (B, C, H, W); labels (B, H, W) int64 with 255 = ignore. The old model has
``C_old`` outputs (background included), the new model ``C = C_old + N_new`` with the new classes
in the last ``N_new`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean(per_pixel: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over all pixels of ``per_pixel * mask`` (MiB's convention: masked pixels count as 0)."""
    if mask is not None:
        per_pixel = per_pixel * mask.to(per_pixel.dtype)
    return per_pixel.mean()


def unbiased_cross_entropy(
    logits: Tensor, labels: Tensor, num_old_classes: int, ignore_index: int = 255
) -> Tensor:
    """MiB's unbiased cross-entropy (fcdl94/MiB ``utils/loss.py::UnbiasedCrossEntropy``).

    A pixel labelled background may belong to any old class, so its log-probability is
    ``logsumexp(z[0:C_old]) - logsumexp(z)``; new-class pixels use ``z_c - logsumexp(z)``.
    Labels below ``num_old_classes`` count as background.

    Reduction: mean over **all** B*H*W pixels, ignored ones counting 0. MiB's trainer builds the
    criterion with ``reduction='none'`` and calls ``loss.mean()`` (fcdl94/MiB ``train.py`` lines 27,
    33, 103-107). MiB's VOC loader maps 255 to background in training (``dataset/voc.py`` 143-148),
    so there the two means coincide; this project keeps 255 ignored (PLOP's convention), and with it
    the reference's reduction is what PLOP's re-implementation of MiB runs (arthurdouillard/
    CVPR2021_PLOP ``train.py`` 47-55 and 352): ignored pixels weigh 0 in a mean over every pixel.

    Args:
        logits: (B, C, H, W) of the current model.
        labels: (B, H, W) class indices of the current model, ``ignore_index`` ignored.
        num_old_classes: C_old, background included.
        ignore_index: Label value excluded from the loss.
    """
    den = torch.logsumexp(logits, dim=1)  # (B, H, W)
    log_bg = torch.logsumexp(logits[:, :num_old_classes], dim=1) - den  # (B, H, W)
    log_new = logits[:, num_old_classes:] - den.unsqueeze(1)  # (B, N_new, H, W)
    log_probs = torch.cat([log_bg.unsqueeze(1), log_new], dim=1)  # (B, 1 + N_new, H, W)
    targets = labels - num_old_classes + 1  # new class c -> channel c - C_old + 1
    targets = torch.where(labels < num_old_classes, torch.zeros_like(labels), targets)
    targets = torch.where(labels == ignore_index, torch.full_like(labels, ignore_index), targets)
    return F.nll_loss(log_probs, targets, ignore_index=ignore_index, reduction="none").mean()


def cross_entropy_over_all_pixels(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy averaged over all B*H*W pixels, ignored ones counting 0.

    The reduction of the reference trainers (``reduction='none'`` then ``.mean()``: fcdl94/MiB
    ``train.py`` 103-107, cvlab-yonsei/ALIFE ``run_step1.py`` 143, arthurdouillard/CVPR2021_PLOP
    ``train.py`` 352). 0, never NaN, when every pixel is ignored.

    Args:
        logits: (B, C, H, W).
        labels: (B, H, W) class indices, ``ignore_index`` ignored.
        ignore_index: Label value that contributes 0.
    """
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").mean()


def unbiased_distillation(new_logits: Tensor, old_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """MiB's unbiased knowledge distillation (``UnbiasedKnowledgeDistillationLoss``, alpha 1).

    The new model's background probability is the sum over background and all new classes;
    old foreground classes keep theirs. Cross-entropy against ``softmax(old_logits)``, divided
    by ``C_old`` (background included), averaged over every pixel (masked pixels count as 0).

    Args:
        new_logits: (B, C, H, W) of the current model.
        old_logits: (B, C_old, H, W) of the frozen previous model.
        mask: Optional (B, H, W) weights per pixel.
    """
    num_old = old_logits.shape[1]
    den = torch.logsumexp(new_logits, dim=1)  # (B, H, W)
    log_old_fg = new_logits[:, 1:num_old] - den.unsqueeze(1)  # (B, C_old - 1, H, W)
    bg_and_new = torch.cat([new_logits[:, :1], new_logits[:, num_old:]], dim=1)
    log_bg = torch.logsumexp(bg_and_new, dim=1) - den  # (B, H, W)
    targets = torch.softmax(old_logits, dim=1)
    per_pixel = (targets[:, 0] * log_bg + (targets[:, 1:] * log_old_fg).sum(dim=1)) / num_old
    return -_masked_mean(per_pixel, mask)


def knowledge_distillation(new_logits: Tensor, old_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plain KD of LwF/ILT (MiB ``KnowledgeDistillationLoss``): softmax over the old channels only.

    Args:
        new_logits: (B, C, H, W); only the first C_old channels are used.
        old_logits: (B, C_old, H, W).
        mask: Optional (B, H, W) weights per pixel.
    """
    num_old = old_logits.shape[1]
    log_q = torch.log_softmax(new_logits[:, :num_old], dim=1)
    per_pixel = (log_q * torch.softmax(old_logits, dim=1)).mean(dim=1)  # (B, H, W)
    return -_masked_mean(per_pixel, mask)


def feature_distillation(new_features: Tensor, old_features: Tensor) -> Tensor:
    """ILT's L2 distillation of encoder features: mean squared error against the frozen model."""
    return F.mse_loss(new_features, old_features)
