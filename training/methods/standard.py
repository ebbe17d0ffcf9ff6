"""The classic baselines and MiB as loss terms (Cermelli et al., CVPR 2020, and its baselines).

- FT: cross-entropy on the step's labels.
- LwF (Li and Hoiem): FT + plain KD on the old classes' softmax (weight 100 as in MiB's code).
- ILT (Michieli and Zanuttigh): LwF + L2 distillation of the encoder output (weight 100).
- MiB: unbiased cross-entropy + unbiased KD (weight 10, fcdl94/MiB ``argparser.py``; its author
  used 100 for 15-1, MiB issue #22), and new classifier rows initialised from background (done by
  ``BiSeNet.add_classes``). Its cross-entropies average over all pixels, ignored ones counting 0, as
  MiB's trainer does (``train.py`` 27-35, 103-107; see ``losses.unbiased_cross_entropy``).
- Joint: FT over all classes in a single step (the upper bound).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from training import losses
from training.methods.base import Batch, LossTerm, Method, StepContext, over_heads

IGNORE = 255


class CrossEntropy(LossTerm):
    """Plain cross-entropy on main and auxiliary logits, mean over non-ignored pixels.

    Kept over labelled pixels, not over all pixels as ``losses.cross_entropy_over_all_pixels``: MiB's
    trainer divides by every pixel (fcdl94/MiB ``train.py`` 27, 107) but its loader turns 255 into
    background in training (``dataset/voc.py`` 143-148, after the crop of ``dataset/utils.py`` 61-68),
    so no pixel of MiB's is ignored and its mean is one over labelled pixels. Dividing by all pixels
    would scale this loss, which trains the shared step 0 of every softmax method, by each batch's
    labelled fraction (BENCHMARKS.md, "The cross-entropy mean of ft, lwf, ilt and joint").
    """

    name = "ce"
    classifies = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        return over_heads(batch, lambda logits: F.cross_entropy(logits, batch.labels, ignore_index=IGNORE))


class UnbiasedCrossEntropy(LossTerm):
    """MiB's unbiased cross-entropy (plain cross-entropy at step 0, as MiB does), mean over all pixels."""

    name = "unbiased_ce"
    classifies = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        if ctx.old_model is None:
            return over_heads(
                batch, lambda logits: losses.cross_entropy_over_all_pixels(logits, batch.labels)
            )
        return over_heads(
            batch, lambda logits: losses.unbiased_cross_entropy(logits, batch.labels, ctx.num_old_classes)
        )


class Distillation(LossTerm):
    """LwF's KD between the old and new model's logits over the old classes."""

    name = "kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        return losses.knowledge_distillation(batch.out.logits, batch.require_old_out().logits)


class UnbiasedDistillation(LossTerm):
    """MiB's unbiased KD: new classes fold into the background of the new model."""

    name = "unbiased_kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        return losses.unbiased_distillation(batch.out.logits, batch.require_old_out().logits)


class EncoderDistillation(LossTerm):
    """ILT's L2 distillation of the encoder output (the backbone's last stage)."""

    name = "feature_kd"
    needs_old_model = True

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        return losses.feature_distillation(batch.out.stages[-1], batch.require_old_out().stages[-1])


def ft() -> Method:
    return Method("ft", [CrossEntropy()])


def joint() -> Method:
    return Method("joint", [CrossEntropy()], trains_all_classes_at_once=True)


def lwf(kd: float = 100.0) -> Method:
    return Method("lwf", [CrossEntropy(), Distillation(kd)])


def ilt(kd: float = 100.0, feature_kd: float = 100.0) -> Method:
    return Method("ilt", [CrossEntropy(), Distillation(kd), EncoderDistillation(feature_kd)])


def mib(kd: float = 10.0) -> Method:
    return Method("mib", [UnbiasedCrossEntropy(), UnbiasedDistillation(kd)])
