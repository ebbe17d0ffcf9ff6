from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from training.models.bisenet import BiSeNet, BiSeNetConfig, SegmentationHead


def tiny(num_classes: int = 4, backbone: str = "resnet10", aux: bool = True) -> BiSeNet:
    return BiSeNet(BiSeNetConfig(num_classes, backbone, context_channels=16, embed_channels=24), aux=aux)


@pytest.mark.parametrize("backbone", ["resnet10", "resnet18", "resnet50", "resnet101"])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 47)])
def test_shapes_at_odd_sizes(backbone: str, size: tuple[int, int]) -> None:
    model = tiny(5, backbone).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model.forward_train(x)
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 5, *size)
    assert out.logits.shape == (2, 5, *size)
    assert [a.shape for a in out.aux_logits] == [(2, 5, *size)] * 2
    assert features.shape[:2] == (2, 24) and out.features.shape == features.shape
    assert features.shape[2] == -(-size[0] // 8) and features.shape[3] == -(-size[1] // 8)
    assert len(out.stages) == 4
    torch.testing.assert_close(logits, out.logits)


def test_aux_heads_only_for_training() -> None:
    assert len(tiny(aux=False).aux_heads) == 0
    assert not any(k.startswith("aux_heads") for k in tiny(aux=False).state_dict())
    assert tiny(aux=False).eval().forward_train(torch.randn(1, 3, 32, 32)).aux_logits == []


def test_add_classes_keeps_old_probabilities_and_splits_background() -> None:
    torch.manual_seed(0)
    model = tiny(4).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        before = model(x).softmax(1)
        model.add_classes(3)
        after = model(x).softmax(1)
    assert after.shape[1] == 7 and model.num_classes == 7 and model.config.num_classes == 7
    torch.testing.assert_close(after[:, 1:4], before[:, 1:4], atol=1e-5, rtol=1e-4)
    for c in [0, 4, 5, 6]:
        torch.testing.assert_close(after[:, c], before[:, 0] / 4, atol=1e-5, rtol=1e-4)
    for head in model.aux_heads:
        assert isinstance(head, SegmentationHead) and head.classifier.out_channels == 7


def test_add_classes_rejects_zero() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        tiny().add_classes(0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        BiSeNetConfig(3, "vgg16")


def test_backbone_weights_load_from_local_file(tmp_path) -> None:
    reference = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = BiSeNet(BiSeNetConfig(3, "resnet18", 16, 16))
    model.load_backbone_weights(path)
    torch.testing.assert_close(model.context_path.stem[0].weight, reference.conv1.weight)
    torch.testing.assert_close(
        model.context_path.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var
    )
    with pytest.raises(ValueError, match="not torchvision resnet50"):
        BiSeNet(BiSeNetConfig(3, "resnet50", 16, 16)).load_backbone_weights(path)
