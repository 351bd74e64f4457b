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
    assert model_info(name).resize == size + 32  # the TensorFlow reference's evaluation crop
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


def test_torchvision_mobilenet_v2_splits_for_cam():
    """MobileNetV2 pools with a function, not an ``avgpool`` layer, and ends in one linear layer."""
    from torchvision.models import mobilenet_v2

    ref = mobilenet_v2(weights=None).eval()
    m = build_model("mobilenet_v2", ref.state_dict())
    assert m.has_cam
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.fc(m.features(x).mean(dim=(2, 3))), m(x), atol=1e-5)
        assert torch.allclose(m(x), ref((x - m.mean) / m.std), atol=1e-4)


@pytest.mark.parametrize("name, crop, resize", [("resnet18", 224, 256), ("inception_v3", 299, 342),
                                                ("efficientnet_b3", 300, 320), ("convnext_tiny", 224, 236)])
def test_torchvision_models_take_the_sizes_their_weights_were_made_for(name, crop, resize):
    """Every torchvision model was given 224/256: inception_v3 and efficientnet_b1..b7 ran below
    the resolution they were trained at."""
    info = model_info(name)
    assert (info.input_size, info.resize, info.num_classes, info.needs_weights) == (crop, resize, 1000, True)


IMAGENET_MEAN_T = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD_T = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def test_torchvision_googlenet_normalizes_as_its_pretrained_weights_expect():
    """torchvision switches GoogLeNet's and Inception v3's transform_input on when it loads
    their weights itself; a state dict given to build_model must run the same network."""
    from torchvision.models import googlenet

    ref = googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=True).eval()
    with_aux = ref.state_dict()  # as torchvision publishes them
    without = {k: v for k, v in with_aux.items() if not k.startswith("aux")}  # as googlenet(weights=...) saves them
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expect = ref((x - IMAGENET_MEAN_T) / IMAGENET_STD_T)
        for state in (with_aux, without):
            assert torch.allclose(build_model("googlenet", state)(x), expect, atol=1e-4)


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


def _input_gradient_cosine(a, b, x) -> float:
    """Cosine similarity of two models' input gradients of the logits' log-sum-exp at ``x``."""
    grads = []
    for m in (a, b):
        xg = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(m(xg).logsumexp(1).sum(), xg)[0])
    return float(torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0))


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
    assert _input_gradient_cosine(plain, nhwc, x) > 0.999


def _unfolded_lite0():
    """EfficientNet-Lite0 as the package's weights describe it: batch normalizations kept, every
    convolution PyTorch's own (what build_model returned before it folded them)."""
    from transforms.models import MODELS

    m = MODELS["efficientnet_lite0"][0](None).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(memory_format=torch.channels_last)


def test_built_models_fold_their_batch_norms_to_the_same_function(photos):
    """Folding removes all 49 normalizations of EfficientNet-Lite0; logits, feature maps and input
    gradients agree with the unfolded network to float rounding, and nothing is folded twice."""
    from torch import nn

    from transforms.images import to_tensor
    from transforms.models import fold_batch_norm

    folded, ref = build_model("efficientnet_lite0"), _unfolded_lite0()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) == 49
    assert fold_batch_norm(folded) == 0
    x = to_tensor(photos)
    with torch.no_grad():
        a, b = folded(x), ref(x)
        fa, fb = folded.features(x), ref.features(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))
    assert torch.allclose(fa, fb, rtol=0, atol=1e-4 * float(fb.abs().max()))
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert _input_gradient_cosine(folded, ref, x) > 0.999


def test_fold_batch_norm_takes_only_a_convolutions_own_normalization():
    from torch import nn

    from transforms.models import fold_batch_norm

    torch.manual_seed(0)

    def bn(c, **kw):
        layer = nn.BatchNorm2d(c, **kw)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        if layer.affine:
            nn.init.uniform_(layer.weight, 0.5, 1.5)
            nn.init.uniform_(layer.bias, -1, 1)
        return layer

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(),  # folded: conv with bias
                        nn.Conv2d(8, 8, 3, groups=8, bias=False), bn(8, affine=False),  # folded: no affine
                        nn.ReLU(), bn(8),  # kept: its input is no convolution's
                        nn.Conv2d(8, 4, 1), bn(4)).eval()  # kept: in training mode (below)
    net[8].train()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expect = net(x)
        assert fold_batch_norm(net) == 2
        assert [type(m).__name__ for m in net] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity", "ReLU",
                                                   "BatchNorm2d", "Conv2d", "BatchNorm2d"]
        assert torch.allclose(net(x), expect, atol=1e-5)


def test_fold_batch_norm_leaves_sequentials_with_their_own_forward_alone():
    """A subclass of ``nn.Sequential`` with its own forward may use a convolution's output
    elsewhere too (here a skip connection): its normalization is not the convolution's alone."""
    from torch import nn

    from transforms.models import fold_batch_norm

    class ConvBnSkip(nn.Sequential):
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    torch.manual_seed(0)
    net = ConvBnSkip(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expect = net(x)
        assert fold_batch_norm(net) == 0
        assert torch.allclose(net(x), expect, atol=1e-6)


def _conv_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if "conv" in e.name}


def test_pointwise_convolutions_run_on_onednn_forward_and_backward_in_one_thread():
    """One thread, batch 2: PyTorch runs a plain 1x1 convolution and its backward on its slow path
    (the control), the built model runs none of its convolutions there."""
    from torch import nn

    from transforms.models import PointwiseConv2d

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = nn.Conv2d(16, 24, 1)
        x = torch.rand(2, 16, 14, 14, requires_grad=True)
        assert "aten::_slow_conv2d_forward" in _conv_ops(lambda: plain(x).sum().backward())
        model = build_model("efficientnet_lite0")
        assert sum(isinstance(m, PointwiseConv2d) for m in model.modules()) == 32  # expand, project and head
        xi = torch.rand(2, 3, 64, 64, requires_grad=True)
        ops = _conv_ops(lambda: model(xi).sum().backward())
    finally:
        torch.set_num_threads(threads)
    assert "aten::mkldnn_convolution" in ops
    assert not {op for op in ops if "slow_conv" in op or "thnn" in op}, ops


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_pointwise_convolution_gradients_match_pytorchs(fmt):
    from torch import nn

    from transforms.models import PointwiseConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1).to(memory_format=fmt)
    x = torch.randn(3, 24, 9, 9).contiguous(memory_format=fmt).requires_grad_(True)
    y = conv(x)
    g = torch.randn_like(y)
    expect = torch.autograd.grad(y, (x, conv.weight, conv.bias), g)
    conv.__class__ = PointwiseConv2d
    y2 = conv(x)
    got = torch.autograd.grad(y2, (x, conv.weight, conv.bias), g)
    assert torch.allclose(y2, y, atol=1e-5) and y2.is_contiguous(memory_format=fmt)
    for a, b in zip(got, expect):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    assert got[0].is_contiguous(memory_format=fmt)
    # Elsewhere it is nn.Conv2d: float64, and CPU autocast (whose convolutions compute in bfloat16).
    x64 = x.detach().double()
    assert torch.allclose(PointwiseConv2d.forward(conv.double(), x64), nn.functional.conv2d(x64, conv.weight, conv.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.float()(x.detach()).dtype == torch.bfloat16


def test_pointwise_convolution_compiles_as_a_plain_convolution():
    """torch.compile cannot trace oneDNN's own call (no fake-tensor kernel): under compilation the
    layer is nn.Conv2d, forward and backward."""
    from torch import nn

    from transforms.models import pointwise_on_onednn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    assert pointwise_on_onednn(net) == 1
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y, ref = compiled(x), net(x)
    assert torch.allclose(y, ref, atol=1e-5)
    g, gref = (torch.autograd.grad(out.sum(), x)[0] for out in (y, ref))
    assert torch.allclose(g, gref, atol=1e-5)
