"""SaliencyMaps: Variant -> Variant with the saliency maps its semantic defenses need.

One batched pass per distinct map request (Aug-MSROI with its noise parameters, or MSROI) on the
map model, which by default is the classifier. Aug-MSROI noise is seeded per image from the run
seed, the image's pixels and the request (not its key, shard or attack: the same image gets the
same map in evaluate and in defend), so reruns are byte-identical.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

import apache_beam as beam
import torch
from apache_beam.ml.inference.base import RunInference

from transforms.defenses import (
    compute_maps,
    denoise_flagged,
    image_noise_levels,
    map_request,
    prepare_requantized,
    prepares_on,
)
from transforms.images import squash, to_tensor
from transforms.models import Classifier, model_info
from transforms.saliency import compile_plain_passes, stretch_map
from transforms.seeds import pixel_digest, sample_seed, seed_tensor
from transforms.specs import Spec

from .config import ModelConfig, check_map_precision
from .errors import SplitErrors, batch_errors
from .model_handlers import _ClassifierHandler, load_classifier
from .records import Variant

log = logging.getLogger(__name__)


def map_requests(defenses: tuple[Spec, ...]) -> dict[str, tuple[str, dict, tuple[Spec, ...]]]:
    """Distinct map requests of the defenses: canonical text -> (defense name, map kwargs, the
    defenses that need this map)."""
    out: dict[str, tuple[str, dict, tuple[Spec, ...]]] = {}
    for d in defenses:
        req = map_request(d)
        if req is not None:
            name, kwargs, users = out.get(req[0], (d.name, req[1], ()))
            out[req[0]] = (name, kwargs, users + (d,))
    return out


class MapHandler(_ClassifierHandler):
    """Batch of Variants -> the same Variants with ``maps`` filled (or ErrorRecords).

    A map request that fails on a batch is reported for each variant and each defense that needs
    that map (stage ``saliency``); the variants go on without it, so their other defenses still
    run (the encode stage skips the defenses whose map is missing: they are reported here).

    Images at their own size (``native``) are squashed whole to the model's input size, and each
    map is stretched back over its image.

    ``precision="bf16"`` runs the map model under bfloat16 autocast, model and images in
    channels_last (the maps themselves are float32): on an H100 about 1.7x the float32 speed
    (``bench/defend.py``). The maps differ slightly from float32's, as another noise draw would.

    ``compile=True`` compiles the map model's passes without activation noise
    (:func:`transforms.saliency.compile_plain_passes`) when a worker loads it.

    ``aug_msroi_gated``'s images get their noise level measured and its flagged images are
    denoised here, on the map model's device. On a GPU
    (``prepare=None``; True or False to force it) the semantic JPEGs' coefficients are computed
    here too (:func:`transforms.defenses.prepare_requantized`), so that the encode stage only
    writes the files: the same bytes, less of the worker's CPU. On the CPU that work stays in the
    encoder, whose numpy code is faster there."""

    def __init__(self, model: ModelConfig, requests: dict[str, tuple[str, dict, tuple[Spec, ...]]], *, seed: int,
                 native: bool = False, precision: str = "fp32", compile: bool = False,
                 prepare: bool | None = None):
        super().__init__(model, native=native)
        check_map_precision(precision)
        self.requests = requests
        self.seed = seed
        self.precision = precision
        self.compile = compile
        self.prepare = prepare

    def inputs(self, images, device):
        if not self.native:
            x = to_tensor(images, device)
        else:
            size = model_info(self.model_config.name).input_size
            x = to_tensor([squash(im, size) for im in images], device)
        return x.contiguous(memory_format=torch.channels_last) if self.precision == "bf16" else x

    def precision_context(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def load_model(self) -> Classifier:
        model = load_classifier(self.model_config, shared=False)  # its hooks must not reach the classifier
        if not model.has_cam:
            raise ValueError(f"map model {self.model_config.name!r} does not end in global average pooling + linear")
        if self.precision == "bf16":
            model = model.to(memory_format=torch.channels_last)  # its own copy (shared=False)
        if self.compile:
            compile_plain_passes(model)
        return model

    def run_inference(self, batch: Sequence[Variant], model: Classifier, inference_args=None):
        out, failed = self._maps(batch, model)
        if failed and len(batch) > 1:  # one bad image (or a batch too big for memory) costs only itself
            log.warning("saliency maps failed on a batch of %d: drawing them image by image", len(batch))
            return [r for v in batch for r in self.run_inference([v], model)]
        return out

    def _maps(self, batch: Sequence[Variant], model: Classifier) -> tuple[list, bool]:
        """(variants with their maps, and error records; whether any map failed)."""
        try:
            device = next(model.parameters()).device
            x = self.inputs([v.image for v in batch], device)
        except Exception as e:  # a failed batch becomes error rows, never a failed bundle
            log.exception("saliency maps failed on a batch of %d", len(batch))
            return batch_errors(batch, "saliency", e), True
        digests = [pixel_digest(v.image) for v in batch]
        maps: list[dict] = [{} for _ in batch]
        seconds: list[dict] = [{} for _ in batch]
        stable: list[dict] = [{} for _ in batch]
        denoised: list[dict] = [{} for _ in batch]
        prepared: list[dict] = [{} for _ in batch]
        errors = []
        for text, (name, kwargs, users) in self.requests.items():
            try:
                # Seeded by the pixels, not the sample: the same image gets the same map (and
                # file) in evaluate and in defend, under any key, shard or attack.
                seeds = seed_tensor([sample_seed(self.seed, digests[i], text) for i in range(len(batch))])
                t0 = time.perf_counter()
                with torch.no_grad(), self.precision_context(device):
                    m, st = compute_maps(name, model, x, kwargs, seeds)
                    m = m.float().cpu().numpy()
                    st = {k: s.float().cpu().numpy() for k, s in (st or {}).items()}
                dt = (time.perf_counter() - t0) / max(1, len(batch))
            except Exception as e:  # only the defenses that need this map fail
                log.exception("saliency map %s failed on a batch of %d", text, len(batch))
                errors += [dataclasses.replace(r, defense=d.text) for d in users
                           for r in batch_errors(batch, "saliency", e)]
                continue
            images = [v.image for v in batch]
            if name == "aug_msroi_gated":  # measured once, for the denoising, the coefficients and the encoder
                try:
                    st["noise_level"] = image_noise_levels(images, device)
                except Exception as e:  # the encoder measures the flagged images itself
                    log.warning("noise levels on %s failed on a batch of %d (the encoder measures them): %s",
                                device, len(batch), e)
            for i, v in enumerate(batch):
                maps[i][text] = stretch_map(m[i], v.image.shape[:2]) if self.native else m[i]
                seconds[i][text] = dt
                if st:
                    stable[i][text] = {k: float(s[i]) for k, s in st.items()}
            if st:
                _on_device(denoised, "denoising", device, len(batch),
                           lambda: denoise_flagged(users, images, st, device))
            if prepares_on(device, self.prepare):
                _on_device(prepared, "semantic JPEG coefficients", device, len(batch),
                           lambda: prepare_requantized(users, images, [mp[text] for mp in maps], st, denoised, device))
        return [dataclasses.replace(v, maps=mp, map_seconds=sc, map_stability=sb, denoised=dn, prepared=pr)
                for v, mp, sc, sb, dn, pr in zip(batch, maps, seconds, stable, denoised, prepared)] + errors, bool(errors)


def _on_device(into: list[dict], what: str, device, n: int, work) -> None:
    """Merge ``work()``'s per-image dicts (encoder work done on the map model's device) into
    ``into``. On failure (out of memory, say) nothing is merged and the encode stage does that
    work on the CPU instead: no image is lost."""
    try:
        for acc, d in zip(into, work()):
            acc.update(d)
    except Exception as e:
        log.warning("%s on %s failed on a batch of %d (the encoder does it on the CPU): %s", what, device, n, e)


class SaliencyMaps(beam.PTransform):
    """Variant -> (Variant with maps, ErrorRecord); the identity when no defense needs a map."""

    def __init__(self, model: ModelConfig, defenses: tuple[Spec, ...], *, seed: int, native: bool = False,
                 precision: str = "fp32", compile: bool = False):
        super().__init__()
        self.requests = map_requests(defenses)
        self.handler = (MapHandler(model, self.requests, seed=seed, native=native, precision=precision,
                                   compile=compile)
                        if self.requests else None)

    def expand(self, variants):
        if self.handler is None:
            return variants, variants | "NoErrors" >> beam.Filter(lambda _: False)
        return variants | "RunMaps" >> RunInference(self.handler) | "Split" >> SplitErrors()
