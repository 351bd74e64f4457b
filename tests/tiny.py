"""A tiny CNN classifier for fast tests, importable by name (``tests.tiny:build``) so that
pipeline tests can use it on every runner, multi-process ones included."""
from __future__ import annotations

import os

import torch
from torch import nn

from transforms.models import Classifier, ModelInfo

NUM_CLASSES = 10


def build(state_dict=None, *, seed: int = 0, num_classes: int = NUM_CLASSES) -> Classifier:
    """conv(3->8, s2) - ReLU - conv(8->16, s2) - ReLU, global average pooling, linear(16->10).

    Appends its process id to the file named by ``SEMJPEG_TEST_LOAD_LOG``, if set, so tests can
    count model loads per worker process.
    """
    log = os.environ.get("SEMJPEG_TEST_LOAD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    g = torch.Generator().manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
    )
    fc = nn.Linear(16, num_classes)
    with torch.no_grad():
        for p in [*features.parameters(), *fc.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model = Classifier(
        features, fc, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tests.tiny:build",
        class_names=tuple(f"class{i}" for i in range(num_classes)), input_size=64,
    )
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


build.model_info = ModelInfo("tests.tiny:build", input_size=64, resize=72, num_classes=NUM_CLASSES)


def build_without_cam(state_dict=None) -> Classifier:
    """The tiny CNN as one network (``fc=None``): it classifies but draws no class activation
    maps."""
    tiny = build(state_dict)
    net = nn.Sequential(tiny.body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), tiny.fc)
    return Classifier(net, None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tests.tiny:build_without_cam",
                      class_names=tiny.class_names, input_size=64).eval()


build_without_cam.model_info = ModelInfo("tests.tiny:build_without_cam", input_size=64, resize=72,
                                         num_classes=NUM_CLASSES)


def build_undeclared(state_dict=None) -> Classifier:
    """The tiny CNN with 3 classes and no ``model_info``: declared 224 px and 1000 classes by default."""
    return build(state_dict, num_classes=3)


def takes_no_weights() -> Classifier:
    """A model factory with the wrong signature (factories take the state dict)."""
    return build()


def near_boundary(model, x, steps=30, past=1.0):
    """Images just past the model's decision boundary: each image pushed along the sign of the
    gradient of its runner-up's margin, bisected to the first step that changes its class."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    top2 = logits.topk(2, dim=1).indices
    margin = (logits.gather(1, top2[:, 1:]) - logits.gather(1, top2[:, :1])).sum()
    d = torch.autograd.grad(margin, x)[0].sign()
    x = x.detach()
    with torch.no_grad():
        first = model(x).argmax(1)
        lo, hi = torch.zeros(len(x)), torch.ones(len(x))
        moved = lambda t: model((x + t[:, None, None, None] * d).clamp(0, 1)).argmax(1) != first
        assert moved(hi).all()
        for _ in range(steps):
            mid = (lo + hi) / 2
            m = moved(mid)
            hi, lo = torch.where(m, mid, hi), torch.where(m, lo, mid)
        return (x + past * hi[:, None, None, None] * d).clamp(0, 1)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def _kill_on_forward(pid_of):
    def hook(module, inputs):
        if _in_dask_worker():
            os.kill(pid_of(), 9)
    return hook


def build_worker_killer(state_dict=None) -> Classifier:
    """The tiny CNN, whose forward pass SIGKILLs the Dask worker process running it (a worker
    killed by the kernel's OOM killer, say); elsewhere it is the tiny CNN."""
    model = build(state_dict)
    model.fc.register_forward_pre_hook(_kill_on_forward(os.getpid))
    return model


build_worker_killer.model_info = ModelInfo("tests.tiny:build_worker_killer", input_size=64, resize=72,
                                           num_classes=NUM_CLASSES)


def build_scheduler_killer(state_dict=None) -> Classifier:
    """The tiny CNN, whose forward pass in a Dask worker SIGKILLs the worker's parent: the
    scheduler's process, for a ``LocalCluster`` of worker processes."""
    model = build(state_dict)
    model.fc.register_forward_pre_hook(_kill_on_forward(os.getppid))
    return model


build_scheduler_killer.model_info = ModelInfo("tests.tiny:build_scheduler_killer", input_size=64, resize=72,
                                              num_classes=NUM_CLASSES)
