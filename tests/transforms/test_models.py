import pytest
import torch

from transforms.models import Classifier, build_model, imagenet_class_names, model_info


def test_registry_errors_list_valid_names():
    with pytest.raises(ValueError, match="unknown model 'nope'.*efficientnet_lite0"):
        model_info("nope")
    with pytest.raises(ValueError, match="needs weights"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="cannot import model factory"):
        model_info("no.such.module:build")


def test_class_names_offline():
    from torchvision.models import ResNet50_Weights

    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert names == tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])  # the shipped copy is torchvision's


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite_variants_load_packaged_weights(name, size):
    m = build_model(name)
    assert isinstance(m, Classifier) and m.has_cam and m.input_size == size
    assert not any(p.requires_grad for p in m.parameters()) and not m.training
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        logits = m(x)
        feats = m.features(x)
        assert logits.shape == (1, 1000)
        assert torch.allclose(m.fc(feats.mean(dim=(2, 3))), logits, atol=1e-5)


def test_normalization_lives_in_the_wrapper():
    m = build_model("efficientnet_lite0")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        direct = m.fc(m.body.net(x * 2 - 1).mean(dim=(2, 3)))  # the package's [-1, 1] input
        assert torch.allclose(m(x), direct, atol=1e-5)


def test_torchvision_model_with_state_dict_splits_for_cam():
    from torchvision.models import resnet18

    ref = resnet18(weights=None, num_classes=1000).eval()
    m = build_model("resnet18", ref.state_dict())
    assert m.has_cam
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expect = ref((x - m.mean) / m.std)
        assert torch.allclose(m(x), expect, atol=1e-4)


def test_custom_factory_by_import_path(tiny_model):
    m = build_model("tests.tiny:build")
    assert m.num_classes == 10 and model_info("tests.tiny:build").input_size == 64


def test_real_model_top1_on_dev_subset(real_model):
    from tests.conftest import DEV, dev_rows
    from transforms.images import decode_image, to_tensor

    rows = dev_rows()[:24]
    x = to_tensor([decode_image((DEV / r["file"]).read_bytes()) for r in rows])
    with torch.no_grad():
        pred = real_model(x).argmax(1)
    labels = torch.tensor([int(r["label"]) for r in rows])
    assert (pred == labels).float().mean() >= 0.75  # ~0.89 over all 500


def _conv_weights(model):
    return [p for p in model.parameters() if p.ndim == 4]


def test_layout_auto_is_channels_last_on_cpu_and_explicit_layouts_are_kept():
    from transforms.models import memory_format

    auto, plain = build_model("efficientnet_lite0"), build_model("efficientnet_lite0", layout="contiguous")
    nhwc = build_model("efficientnet_lite0", layout="channels_last")
    for m in (auto, nhwc):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(m))
        assert not _conv_weights(m)[0].is_contiguous()  # the stem: 3 input channels, 3x3
    assert all(w.is_contiguous() for w in _conv_weights(plain))
    assert memory_format("auto", "cpu") == torch.channels_last
    assert memory_format("auto", "cuda") == torch.contiguous_format  # not measured there: unchanged
    with pytest.raises(ValueError, match="memory format must be one of auto, contiguous, channels_last, got 'nhwc'"):
        build_model("efficientnet_lite0", layout="nhwc")


def test_layouts_agree_to_rounding_on_real_images(photos):
    """channels_last changes the arithmetic's order, not the model: logits and input gradients
    agree to float rounding, and the activations come out in the weights' layout."""
    from transforms.images import to_tensor

    x = to_tensor(photos)  # 64x64: the real model's weights at a small size, as fast as the test needs
    plain = build_model("efficientnet_lite0", layout="contiguous")
    nhwc = build_model("efficientnet_lite0", layout="channels_last")
    with torch.no_grad():
        a, b = plain(x), nhwc(x)
        assert nhwc.features(x).is_contiguous(memory_format=torch.channels_last)
        assert plain.features(x).is_contiguous()
    assert torch.allclose(a, b, rtol=0, atol=1e-3 * float(a.abs().max()))
    assert torch.equal(a.argmax(1), b.argmax(1))
    grads = []
    for m in (plain, nhwc):
        xg = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(m(xg).logsumexp(1).sum(), xg)[0])
    cos = torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert float(cos) > 0.999
