"""SDR: sparse and disentangled latent representations as loss terms.

Paper: `Continual Semantic Segmentation via Repulsion-Attraction of Sparse and Disentangled Latent
Representations` (Michieli and Zanuttigh, CVPR 2021) - https://arxiv.org/abs/2103.06342;
code: LTTM/SDR @8638296 (``utils/loss.py``, ``train.py``, ``argparser.py``).

Every term works on the backbone's output, SDR's ``features['body']`` (``train.py`` 161-224: every
SDR loss gets ``features['body']``; ``segmentation_module.py`` 123-160: ``body`` is the ResNet's
output before the DeepLab head). Here that is ``out.stages[-1]``, the ResNet's last stage
(B, ``model.body_channels``, H/32, W/32) - 512 channels for resnet10/18, 2048 for resnet50/101 as in
SDR; labels are nearest-downsampled to its size (``train.py`` 161-163). The four terms share one
``PrototypeBank``: running per-class body-feature means kept in ``ctx.state["prototypes"]``.

Weights and switches of ``--method SDR`` (``argparser.py`` 44-63), used for every protocol (the
repository ships no per-protocol values; its 19-1 scripts run ``--method SDR``):

- prototype matching, ``loss_de_prototypes`` 1e-2 with ``loss_de_prototypes_sumafter``; only at
  step > 0 (``utils/loss.py`` 487): the batch's mean body feature of each old class (pseudo-labelled
  by the old model's argmax on background pixels) matches its stored prototype;
- attraction, ``loss_fc`` 1e-3; only at step > 0 (``utils/loss.py`` 369): features are pulled to their
  class prototype, background included (``lfc_nobgr`` off), no L2 normalisation (``lfc_L2normalized``
  off);
- repulsion, ``lfc_sep_clust`` 1e-3; only at step > 0: mean inverse distance of the batch's class
  means (``lfc_sep_clust_ison_proto`` and ``lfc_orth_sep`` off);
- sparsity, ``loss_featspars`` 1e-3 at every step, step 0 included (``train.py`` 223):
  ``lfs_normalization='max_maskedforclass'``, ``lfs_shrinkingfn='exponential'``,
  ``lfs_loss_fn_touse='ratio'``;
- output distillation: MiB's unbiased KD at ``loss_kd`` **100** with ``unkd`` and MiB's unbiased
  cross-entropy (``unce``). These are MiB's terms: SDR as its repository runs it is
  ``mib(kd=100)+sdr``; ``mib+sdr`` keeps MiB's own KD 10.

``sdr`` has no classification loss: combine it, e.g. ``mib(kd=100)+sdr``.

Differences from the code: ``--method SDR`` does not set ``init_balanced``, so SDR's new classifier
rows start from the default initialisation, while ``BiSeNet.add_classes`` always applies MiB's; class
means are exact, where SDR's ``features[mask.expand(...)].view(...)`` (``train.py`` 474,
``utils/loss.py`` 383 and 501) interleaves channels and pixels for batches > 1; the background
prototype is learned at step 0 in both settings (SDR skips background in overlapped steps and so
leaves its prototype at zero, ``train.py`` 465-466); BiSeNet's body is at 1/32 where SDR's DeepLab
body runs at output stride 16.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from training.methods.base import Batch, LossTerm, Method, StepContext
from training.models.bisenet import SegmentationOutput

IGNORE = 255
PROTOTYPES = "prototypes"
EPS = 1e-12


def body(out: SegmentationOutput) -> Tensor:
    """SDR's ``features['body']``: the backbone's last stage, (B, D_body, H/32, W/32)."""
    return out.stages[-1]


def downsample_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to ``size`` (SDR's label downsampling)."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class feature sums and pixel counts; labels outside ``[0, num_classes)`` are skipped.

    Args:
        features: (B, D, h, w).
        labels: (B, h, w) class indices at the features' size.
        num_classes: Number of rows of the result.

    Returns:
        Sums (num_classes, D) (differentiable) and counts (num_classes,) int64.
    """
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (P, D)
    lbl = labels.reshape(-1)  # (P,)
    keep = (lbl >= 0) & (lbl < num_classes)
    flat, lbl = flat[keep], lbl[keep]
    sums = flat.new_zeros(num_classes, flat.shape[1]).index_add(0, lbl, flat)
    return sums, torch.bincount(lbl, minlength=num_classes)


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mean feature of every class present in ``labels``.

    Returns:
        Means (K, D) and the K present class indices (ascending).
    """
    sums, counts = class_sums(features, labels, num_classes)
    present = torch.nonzero(counts).flatten()
    return sums[present] / counts[present, None].to(sums.dtype), present


class PrototypeBank:
    """Running per-class means of the body features, shared by the SDR terms of one method.

    Stored as ``ctx.state["prototypes"] = {"prototypes": (C, D_body) float32, "counts": (C,) int64}``.
    Only the classes learned in the current step are updated (background only at step 0, since
    later it also covers unlabelled old classes); old prototypes stay frozen. This is SDR's rule for
    overlapped and disjoint data without its quirk of leaving the background prototype at zero.
    Each update is the exact cumulative mean ``p <- (sum_batch f + n p) / (n + k)``, ``n <- n + k``,
    run once per iteration before the losses, over all epochs of the step.
    """

    def __init__(self) -> None:
        self._last_batch: weakref.ref[Batch] | None = None
        self._filled: weakref.ref[StepContext] | None = None

    @staticmethod
    def prototypes(ctx: StepContext) -> Tensor:
        return ctx.state[PROTOTYPES]["prototypes"]

    @staticmethod
    def counts(ctx: StepContext) -> Tensor:
        return ctx.state[PROTOTYPES]["counts"]

    def start(self, ctx: StepContext) -> None:
        """Creates the bank or grows it to the model's classes (idempotent)."""
        num_classes, dim = ctx.num_classes, ctx.model.body_channels
        stored = ctx.state.get(PROTOTYPES, {})
        protos = stored.get("prototypes", torch.zeros(0, dim)).to(ctx.device, torch.float32)
        counts = stored.get("counts", torch.zeros(0, dtype=torch.long)).to(ctx.device, torch.long)
        if protos.shape[1] != dim:
            raise ValueError(
                f"stored SDR prototypes have {protos.shape[1]} dimensions, the backbone outputs {dim} "
                "(prototypes from before SDR used the backbone output): continue this model with mib"
            )
        missing = num_classes - protos.shape[0]
        ctx.state[PROTOTYPES] = {
            "prototypes": torch.cat([protos, protos.new_zeros(missing, dim)]),  # (C, D)
            "counts": torch.cat([counts, counts.new_zeros(missing)]),  # (C,)
        }

    def observe(self, batch: Batch, ctx: StepContext) -> None:
        """Adds the batch's detached features of the step's classes (once per batch)."""
        if self._last_batch is not None and self._last_batch() is batch:
            return
        self._last_batch = weakref.ref(batch)
        features = body(batch.out).detach().float()
        self._accumulate(
            ctx, features, downsample_labels(batch.labels, features.shape[2:]), ctx.new_class_indices
        )

    @torch.no_grad()
    def fill_missing(self, ctx: StepContext) -> None:
        """Computes the prototypes of the step's classes that were never observed (one pass, eval mode).

        Covers steps whose training did not run the SDR terms, e.g. a step-0 model shared by methods.
        Runs once per step however many terms share the bank.
        """
        if self._filled is not None and self._filled() is ctx:
            return
        self._filled = weakref.ref(ctx)
        counts = self.counts(ctx)
        missing = [c for c in ctx.new_class_indices if counts[c] == 0]
        if not missing:
            return
        model, was_training = ctx.model, ctx.model.training
        model.eval()
        for images, labels in ctx.train_loader:
            features = body(model.forward_train(images.to(ctx.device))).float()
            self._accumulate(
                ctx, features, downsample_labels(labels.to(ctx.device), features.shape[2:]), missing
            )
        model.train(was_training)

    @staticmethod
    def _accumulate(ctx: StepContext, features: Tensor, labels: Tensor, classes: range | list[int]) -> None:
        allowed = torch.zeros(ctx.num_classes + 1, dtype=torch.bool, device=labels.device)
        allowed[list(classes)] = True
        labels = torch.where(allowed[labels.clamp(0, ctx.num_classes)], labels, IGNORE)
        sums, k = class_sums(features, labels, ctx.num_classes)  # (C, D), (C,)
        protos, counts = PrototypeBank.prototypes(ctx), PrototypeBank.counts(ctx)
        seen = k > 0
        n = counts[seen, None].double()
        updated = (sums[seen].double() + n * protos[seen].double()) / (n + k[seen, None].double())
        protos[seen] = updated.float()
        counts[seen] += k[seen]


class SDRTerm(LossTerm):
    """Base of the SDR terms: keeps the shared ``PrototypeBank`` up to date around the loss."""

    def __init__(self, weight: float, bank: PrototypeBank) -> None:
        super().__init__(weight)
        self.bank = bank

    def on_step_start(self, ctx: StepContext) -> None:
        self.bank.start(ctx)

    def __call__(self, batch: Batch, ctx: StepContext) -> Tensor:
        self.bank.observe(batch, ctx)
        features = body(batch.out).float()  # (B, D_body, h, w)
        return self.loss(features, downsample_labels(batch.labels, features.shape[2:]), batch, ctx)

    def loss(self, features: Tensor, labels: Tensor, batch: Batch, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def on_step_end(self, ctx: StepContext) -> None:
        self.bank.start(ctx)  # the hooks may run alone, on a model trained without SDR
        self.bank.fill_missing(ctx)


class PrototypeMatching(SDRTerm):
    """Old-class batch means of the current features match their stored prototypes.

    Pseudo-labels at feature resolution: the old model's argmax (nearest-downsampled) on pixels
    whose label is background, the label itself where an old class is visible (sequential data),
    ignore elsewhere. For each old foreground class present (with a stored prototype):
    ``MSE(mean feature, prototype)``, summed and divided by the number of such classes.
    """

    name = "sdr_matching"
    needs_old_model = True

    def loss(self, features: Tensor, labels: Tensor, batch: Batch, ctx: StepContext) -> Tensor:
        old_logits = batch.require_old_out().logits  # (B, C_old, H, W)
        old_pred = downsample_labels(old_logits.argmax(dim=1), features.shape[2:])  # (B, h, w)
        pseudo = torch.where(labels == 0, old_pred, torch.where(labels < ctx.num_old_classes, labels, IGNORE))
        means, present = class_means(features, pseudo, ctx.num_old_classes)  # (K, D), (K,)
        keep = (present > 0) & (self.bank.counts(ctx)[present] > 0)
        if not keep.any():
            return features.new_zeros(())
        protos = self.bank.prototypes(ctx)[present[keep]]  # (K', D)
        per_class = ((means[keep] - protos) ** 2).mean(dim=1)  # (K',)
        return per_class.sum() / keep.sum()


class FeatureAttraction(SDRTerm):
    """Features of each class present (background included) are pulled to its prototype.

    ``sum_c MSE(features of c, p_c) / K`` over the K classes present that have a prototype. SDR
    divides the running sum by K inside its class loop (so earlier classes are divided several
    times); here the sum is divided once.
    """

    name = "sdr_attraction"
    needs_old_model = True

    def loss(self, features: Tensor, labels: Tensor, batch: Batch, ctx: StepContext) -> Tensor:
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (P, D)
        lbl = labels.reshape(-1)  # (P,)
        counts = self.bank.counts(ctx)
        classes = [c for c in torch.unique(lbl).tolist() if c < ctx.num_classes and counts[c] > 0]
        if not classes:
            return features.new_zeros(())
        protos = self.bank.prototypes(ctx)
        per_class = [((flat[lbl == c] - protos[c]) ** 2).mean() for c in classes]
        return torch.stack(per_class).sum() / len(classes)


class FeatureRepulsion(SDRTerm):
    """Mean inverse Euclidean distance between the batch's class means (each pair once).

    Classes: every label present at feature resolution, background included, ignore excluded.
    Zero with fewer than two classes; distances are clamped at 1e-12.
    """

    name = "sdr_repulsion"
    needs_old_model = True

    def loss(self, features: Tensor, labels: Tensor, batch: Batch, ctx: StepContext) -> Tensor:
        means, _ = class_means(features, labels, ctx.num_classes)  # (K, D)
        if means.shape[0] < 2:
            return features.new_zeros(())
        i, j = torch.triu_indices(means.shape[0], means.shape[0], offset=1, device=means.device)
        distances = (means[i] - means[j]).norm(dim=1).clamp_min(EPS)  # (K (K - 1) / 2,)
        return (1.0 / distances).mean()


class FeatureSparsity(SDRTerm):
    """Few active channels per pixel (SDR's ``max_maskedforclass`` + ``exponential`` + ``ratio``).

    Each pixel's features are divided by the largest activation over its label's region in the
    batch (every label value is a region, the ignore label included, as in SDR); per pixel the loss
    is ``sum_k exp(f_k) / sum_k f_k``, averaged over pixels. Pixels with no activation (sum 0, which
    SDR divides by 1e-15) are already sparse and are left out; the region maxima are clamped at 1e-12.
    """

    name = "sdr_sparsity"

    def loss(self, features: Tensor, labels: Tensor, batch: Batch, ctx: StepContext) -> Tensor:
        lbl = labels.reshape(-1)  # (P,)
        pixel_max = features.amax(dim=1).reshape(-1)  # (P,)
        region_max = pixel_max.new_zeros(IGNORE + 1).scatter_reduce(
            0, lbl, pixel_max, "amax", include_self=False
        )
        normed = features / region_max[labels].clamp_min(EPS)[:, None]  # (B, D, h, w)
        total = normed.sum(dim=1)  # (B, h, w)
        active = total > EPS
        if not active.any():
            return features.new_zeros(())
        return (normed.exp().sum(dim=1)[active] / total[active]).mean()


def sdr(
    matching: float = 1e-2, attraction: float = 1e-3, repulsion: float = 1e-3, sparsity: float = 1e-3
) -> Method:
    """SDR's latent terms with ``--method SDR``'s weights; add a classifier, e.g. ``mib(kd=100)+sdr``."""
    bank = PrototypeBank()
    return Method(
        "sdr",
        [
            PrototypeMatching(matching, bank),
            FeatureAttraction(attraction, bank),
            FeatureRepulsion(repulsion, bank),
            FeatureSparsity(sparsity, bank),
        ],
    )
