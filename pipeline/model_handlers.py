"""Model handlers for RunInference: the classifier loads once per worker process and is shared.

Gradient stages (attacks) bring their own inference: RunInference's stock PyTorch handlers run
under ``no_grad``. Each handler unpacks a batch, calls ``transforms/`` functions and packs the
results; failures of one attack on one batch become error records, never a lost row.
"""
from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import fsspec
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler

from transforms import metrics
from transforms.attacks import run_attack
from transforms.images import resize_and_crop, to_tensor, to_uint8
from transforms.models import Classifier, build_model, model_info, resolve_device
from transforms.seeds import sample_seed, seed_tensor
from transforms.specs import Spec

from .allocator import keep_freed_memory
from .config import ModelConfig
from .errors import batch_errors, error_reason
from .records import Defended, ErrorRecord, Result, Sample, Variant

log = logging.getLogger(__name__)


#: Classifiers shared by the attack and classify stages of one process, while either holds one.
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def load_classifier(config: ModelConfig, *, shared: bool = True) -> Classifier:
    """The configured classifier; ``weights`` may be any fsspec URL (loaded weights-only).

    ``shared``: one instance per configuration and process, whichever stage asks first (the
    model is only read: attacks take input gradients, parameters never change). The saliency
    stage asks for a private one, because Aug-MSROI hooks noise into the model's layers.
    """
    keep_freed_memory()  # before the first batch: see pipeline.allocator
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if not shared:
        return _build_classifier(config)
    with _SHARED_LOCK:
        model = _SHARED.get(config)
        if model is None:
            model = _SHARED[config] = _build_classifier(config)
        return model


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut at ``limit`` characters (torch's load and
    state-dict errors run to dozens of lines). A first line ending in a colon only announces the
    reason (``Error(s) in loading state_dict for ResNet:``), so the next line comes with it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = f"{lines[0]} {lines[1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else ""
    text = f"{type(e).__name__}: {first}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _load_reason(e: BaseException) -> str:
    """Why torch.load failed, in one line. Its weights-only refusal opens with a paragraph about
    PyTorch 2.6 defaults that suggests unsafe loading; the reason proper follows
    ``WeightsUnpickler error:`` (garbage, or a whole pickled model rather than a state dict)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()]
        if rest:
            found = rest[0].split(" was not an allowed")[0]
            return f"only state dicts are loaded (weights_only), and this file has {found}"
    return _first_line(e)


def _build_classifier(config: ModelConfig) -> Classifier:
    """Build the configured classifier; a ValueError that says which step failed (reading the
    weights, unpickling them, building the model with them) and why, in one line."""
    state = None
    if config.weights:
        try:
            with fsspec.open(config.weights, "rb") as f:
                data = f.read()
        except Exception as e:  # missing, unreadable, no fsspec backend, a cloud credentials error
            raise ValueError(f"cannot read the weights {config.weights}: {_first_line(e)}") from e
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"the weights {config.weights} are not a torch state dict "
                             f"(torch.load: {_load_reason(e)})") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    try:
        model = build_model(config.name, state, device=resolve_device(config.device), layout=config.memory_format)
    except Exception as e:
        with_weights = f" with the weights {config.weights}" if config.weights else ""
        raise ValueError(f"cannot build model {config.name!r}{with_weights}: {_first_line(e)}") from e
    log.info("loaded %s on %s", config.name, next(model.parameters()).device)
    return model


def check_device(device: str) -> None:
    """Raise ValueError (one line) when ``device`` names a CUDA device this machine lacks."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= count:
        have = "no CUDA device" if count == 0 else f"{count} CUDA device(s), cuda:0..cuda:{count - 1}"
        raise ValueError(f"--device {device}: this machine has {have} (--device auto uses one when present)")


def check_model(config: ModelConfig, *, maps: bool = False, role: str = "model") -> Classifier | None:
    """Build the configured model once before any work starts: missing or damaged weights,
    weights that do not fit the model, a model factory that fails, and (``maps``) a map model
    without class activation maps are one-line ValueErrors here, where they used to fail every
    worker with a traceback. ``role`` names the model in the message.

    A model configured for the CPU is built as the stages would build it and returned, shared
    (see load_classifier): a caller that holds it while an in-process runner runs spares that
    run a second load. A GPU model is checked on the CPU and dropped (None)."""
    on_cpu = resolve_device(config.device).type == "cpu"
    try:
        model = load_classifier(config) if on_cpu else _build_classifier(replace(config, device="cpu"))
    except ValueError as e:
        raise ValueError(str(e) if role == "model" else f"{role}: {e}") from None
    if maps and not model.has_cam:
        raise ValueError(f"{role} {config.name!r} draws no saliency maps: it does not end in global "
                         "average pooling + linear (its defenses need class activation maps)")
    _check_declared(model, config.name, role)
    return model if on_cpu else None


def _check_declared(model: Classifier, name: str, role: str) -> None:
    """The built model must be what its ModelInfo declared: labels and targets are checked
    against the declared class count before any model is loaded, and images are cropped to the
    declared size (a 3-class factory without ``model_info``, declared 1000 classes by default,
    took the label 7, and the attack of every image batched with it failed on an IndexError)."""
    info = model_info(name)
    outputs = model.fc.out_features if model.fc is not None else model.num_classes
    found = {"classes": (model.num_classes, info.num_classes), "outputs": (outputs, info.num_classes),
             "input size": (model.input_size, info.input_size)}
    wrong = [f"{what} {got} (declared {want})" for what, (got, want) in found.items() if got != want]
    if wrong:
        raise ValueError(f"{role} {name!r} is not what its model_info declares: {', '.join(wrong)}; give its "
                         "factory a model_info attribute (transforms.models.ModelInfo) that matches it")


def input_attack(meta: dict | None) -> str | None:
    """The attack that made an input, as recorded in its semjpeg ``<key>.json`` (an adversarial
    set written by ``semjpeg attack``): None for clean inputs and for anything else. A row with
    attack ``clean`` (an adversarial set stored again by ``attack``, or defended by ``defend``)
    passes on its own ``input_attack``."""
    doc = meta.get("semjpeg") if isinstance(meta, dict) else None
    spec = doc.get("attack_spec") if isinstance(doc, dict) else None
    if spec == "clean":
        spec = doc.get("input_attack")
    return spec if isinstance(spec, str) and spec != "clean" else None


class _ClassifierHandler(ModelHandler):
    """Shared base: loads the configured classifier; batches of ``batch_size`` (a bundle's last
    one may be smaller: RunInference's batching flushes what is left when a bundle ends).

    ``native``: the images keep their own sizes (``--crop 0``); the model sees each through its
    own preprocessing (``inputs``)."""

    def __init__(self, model: ModelConfig, *, native: bool = False):
        super().__init__(min_batch_size=model.batch_size, max_batch_size=model.batch_size)
        self.model_config = model
        self.native = native

    def inputs(self, images: Sequence[np.ndarray], device) -> torch.Tensor:
        """The model's input batch for uint8 HWC ``images``: as they are, or for images at their
        own size the model's resize and center crop of each (its evaluation preprocessing)."""
        if self.native:
            info = model_info(self.model_config.name)
            images = [resize_and_crop(im, resize=info.resize, crop=info.input_size) for im in images]
        return to_tensor(images, device)

    def load_model(self) -> Classifier:
        return load_classifier(self.model_config)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it.
        return sum(getattr(getattr(x, "image", None), "nbytes", 0) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "semjpeg"


class AttackHandler(_ClassifierHandler):
    """Batch of Samples -> per sample, a list of Variants (clean first) or ErrorRecords.

    The clean prediction is computed once per batch; it is the label attacked unless
    ``attack_labels="label"`` and the sample has one.
    """

    def __init__(self, model: ModelConfig, attacks: tuple[Spec, ...], *, seed: int, attack_labels: str,
                 native: bool = False):
        super().__init__(model, native=native)
        if native and any(a.name != "clean" for a in attacks):
            raise ValueError("attacks run at the model's input size, not on images at their own size")
        self.attacks = attacks
        self.seed = seed
        self.attack_labels = attack_labels

    def run_inference(self, batch: Sequence[Sample], model: Classifier, inference_args=None) -> Iterable[list]:
        try:
            device = next(model.parameters()).device
            x = self.inputs([s.image for s in batch], device)
            with torch.no_grad():
                clean_logits = model(x)
        except Exception as e:  # a failed batch becomes error rows, never a failed bundle
            if len(batch) > 1:  # one bad image (or a batch too big for memory) costs only itself
                log.warning("clean forward pass failed on a batch of %d (%s): image by image", len(batch), e)
                return [out for s in batch for out in self.run_inference([s], model)]
            log.exception("clean forward pass failed on a batch of %d", len(batch))
            return [[err] for err in batch_errors(batch, "attack", e)]
        clean_pred = clean_logits.argmax(dim=1)
        if self.attack_labels == "label":
            labels = torch.tensor(
                [s.label if s.label is not None else int(p) for s, p in zip(batch, clean_pred.tolist())],
                dtype=torch.int64, device=device,
            )
        else:
            labels = clean_pred
        out: list[list] = [[] for _ in batch]
        for spec in self.attacks:
            try:
                variants = self._attack(spec, model, batch, x, labels, clean_logits, clean_pred)
            except Exception as e:  # one attack failing on a batch loses nothing else
                if len(batch) > 1:  # nor its other images: each is attacked alone
                    log.warning("attack %s failed on a batch of %d (%s): image by image", spec.text, len(batch), e)
                    variants = [self._attack_alone(spec, model, batch, i, x, labels, clean_logits, clean_pred)
                                for i in range(len(batch))]
                else:
                    log.exception("attack %s failed on a batch of %d", spec.text, len(batch))
                    variants = [_attack_error(batch[0], spec, e)]
            for slot, v in zip(out, variants):
                slot.append(v)
        return out

    def _attack_alone(self, spec, model, batch, i, x, labels, clean_logits, clean_pred) -> Variant | ErrorRecord:
        one = slice(i, i + 1)
        try:
            (variant,) = self._attack(spec, model, batch[one], x[one], labels[one], clean_logits[one], clean_pred[one])
            return variant
        except Exception as e:
            log.exception("attack %s failed on %s", spec.text, batch[i].key)
            return _attack_error(batch[i], spec, e)

    def _attack(self, spec, model, batch, x, labels, clean_logits, clean_pred) -> list[Variant]:
        seeds = seed_tensor([sample_seed(self.seed, s.identity, spec.identity) for s in batch])
        if x.is_cuda:  # the batch's own GPU: with --device cuda:N the current device is cuda:0
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        result, target = run_attack(spec, model, x, labels, clean_logits=clean_logits, seeds=seeds)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        seconds = (time.perf_counter() - t0) / max(1, len(batch))
        adv = result.images
        clean = spec.name == "clean"
        if clean:
            success = [None] * len(batch)
            logits = clean_logits
        else:
            with torch.no_grad():
                logits = model(adv)
            pred = logits.argmax(dim=1)
            ok = pred == target if target is not None else pred != labels
            success = ok.tolist()
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        # The perturbation as stored, in whole uint8 levels (exact), scaled in float64: k levels
        # read k/255, as a budget eps=k/255 is written (the [0, 1] images' float32 rounding read
        # 4 levels as 0.0156863034, above 4/255).
        stored, reference = torch.round(adv * 255.0), torch.round(x * 255.0)
        linf, l2, rmse = ((f(stored, reference).double() / 255.0).tolist()
                          for f in (metrics.linf, metrics.l2, metrics.rmse))
        images = to_uint8(adv)
        cp = clean_pred.tolist()
        tg = target.tolist() if target is not None else [None] * len(batch)
        it = result.iterations.tolist()
        return [
            Variant(
                s, spec, s.image if clean else images[i], cp[i], success[i], tg[i], int(it[i]),
                0.0 if clean else seconds, linf[i], l2[i], rmse[i], probs=probs[i],
            )
            for i, s in enumerate(batch)
        ]


def _attack_error(s: Sample, spec: Spec, e: BaseException) -> ErrorRecord:
    return ErrorRecord(s.source_index, s.source, s.key, None, "attack", error_reason(e), spec.text)


class ClassifyHandler(_ClassifierHandler):
    """Batch of Defended -> Results: top-5 predictions and quality against the clean image."""

    def __init__(self, model: ModelConfig, *, run_id: str, native: bool = False):
        super().__init__(model, native=native)
        self.run_id = run_id

    def get_num_bytes(self, batch: Sequence[Defended]) -> int:
        return sum(len(d.data) for d in batch)

    def run_inference(self, batch: Sequence[Defended], model: Classifier, inference_args=None) -> Iterable[Result | ErrorRecord]:
        try:
            return self._classify(batch, model)
        except Exception as e:  # a failed batch becomes error rows, never a failed bundle
            if len(batch) > 1:  # one bad image (or a batch too big for memory) costs only itself
                log.warning("classification failed on a batch of %d (%s): image by image", len(batch), e)
                return [r for d in batch for r in self.run_inference([d], model)]
            log.exception("classification failed on a batch of %d", len(batch))
            return batch_errors(batch, "classify", e)

    def _quality(self, batch: Sequence[Defended], device, seen_all: torch.Tensor | None = None
                 ) -> tuple[list[float], list[float]]:
        """PSNR and SSIM of each stored image against its clean image, at their full size: as one
        batch (``seen_all``: the stored images, already a tensor), or one by one for images at
        their own sizes (SSIM None below its window, 11x11)."""
        if not self.native:
            clean = to_tensor([d.variant.sample.image for d in batch], device)
            return metrics.psnr(seen_all, clean).tolist(), metrics.ssim(seen_all, clean).tolist()
        psnr, ssim = [], []
        for d in batch:
            seen, clean = to_tensor([d.decoded], device), to_tensor([d.variant.sample.image], device)
            psnr += metrics.psnr(seen, clean).tolist()
            small = min(d.decoded.shape[:2]) < metrics.SSIM_WINDOW  # SSIM is undefined: null
            ssim += [None] if small else metrics.ssim(seen, clean).tolist()
        return psnr, ssim

    def _classify(self, batch: Sequence[Defended], model: Classifier) -> list[Result]:
        device = next(model.parameters()).device
        # A defense that stored the variant losslessly shows the model the pixels the attack stage
        # already classified: reuse that softmax, run the model on the rest only.
        known = [d.variant.probs is not None and np.array_equal(d.decoded, d.variant.image) for d in batch]
        with torch.no_grad():
            todo = [i for i, k in enumerate(known) if not k]
            full = None if self.native else to_tensor([d.decoded for d in batch], device)
            seen = self.inputs([batch[i].decoded for i in todo], device) if self.native else full[todo]
            fresh = iter(torch.softmax(model(seen).float(), dim=1).cpu() if todo else ())
            probs = torch.stack([torch.from_numpy(d.variant.probs) if k else next(fresh) for d, k in zip(batch, known)])
            top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
            psnr, ssim = self._quality(batch, device, full)
        top_p, top_i = top_p.tolist(), top_i.tolist()
        names = model.class_names
        results = []
        for i, d in enumerate(batch):
            v, s = d.variant, d.variant.sample
            h, w = d.decoded.shape[:2]
            pred = top_i[i][0]
            coded = len(d.data) - (d.extra.get("profile_bytes") or 0)  # the carried colour profile aside
            row = {
                "key": s.key, "source": s.source, "label": s.label,
                "attack": v.attack.name, "attack_spec": v.attack.text, "input_attack": input_attack(s.meta),
                "defense": d.defense.name, "defense_spec": d.defense.text,
                "pred": pred, "pred_name": names[pred], "prob": top_p[i][0],
                "top5": [{"label": a, "prob": b} for a, b in zip(top_i[i], top_p[i])],
                "correct": None if s.label is None else pred == s.label,
                "clean_pred": v.clean_pred, "agree_clean": None,
                "bytes": coded, "bpp": coded * 8.0 / (h * w),
                "psnr": psnr[i], "ssim": ssim[i],
                "linf": v.linf, "l2": v.l2, "rmse": v.rmse,
                "success": v.success, "target": v.target,
                "iterations": v.iterations, "attack_seconds": v.seconds,
                "width": w, "height": h, "model": self.model_config.name, "run_id": self.run_id,
                **d.extra,
            }
            results.append(Result(s.source_index, s.key, row, d.data, d.ext, s.label, s.meta, d.members))
        return results
