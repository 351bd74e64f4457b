"""EncodeSemanticJpeg: Variant -> Defended, one per defense spec (stored bytes + decoded pixels).

Defenses that match another's size (``jpeg:match=aug_msroi``) are encoded after it, per image.
"""
from __future__ import annotations

import dataclasses
import io
import logging

import apache_beam as beam
from apache_beam.metrics import Metrics
from PIL import Image

from transforms.defenses import apply_defense, denoise_weight, map_request, match_target, parse_match_ref
from transforms.images import with_colour_profile
from transforms.jpeg import decode_rgb
from transforms.specs import Spec
from transforms.visual import heatmap

from .errors import SplitErrors, error_reason
from .records import Defended, ErrorRecord, Variant

log = logging.getLogger(__name__)


def resolve_matches(defenses: tuple[Spec, ...]) -> dict[str, str]:
    """``jpeg:match=X`` -> the text of the defense X names (its full spec text, or its name when
    that is unambiguous). Raises ValueError for unknown, ambiguous or chained references."""
    from .config import spec_identity

    out = {}
    for d in defenses:
        ref = match_target(d)
        if ref is None:
            continue
        hits = [o for o in defenses if o.text == ref]
        if not hits and ":" in ref:  # the same spec written otherwise: parameters in another order, ';'
            try:
                ident = spec_identity(parse_match_ref(ref), "defense")
            except ValueError as e:
                raise ValueError(f"{d.text}: cannot read the defense to match: {e}") from None
            hits = [o for o in defenses if spec_identity(o, "defense") == ident]
        if not hits:
            hits = [o for o in defenses if o.name == ref]
        if not hits:
            raise ValueError(f"{d.text}: no defense {ref!r} in this run to match; "
                             f"defenses: {', '.join(o.text for o in defenses)}")
        if len(hits) > 1:
            raise ValueError(f"{d.text}: {ref!r} is ambiguous ({', '.join(h.text for h in hits)}); name one "
                             "with its parameters separated by ';' (quoted in a shell), e.g. "
                             f"'jpeg:match={hits[0].text.replace(',', ';')}'")
        if match_target(hits[0]) is not None or hits[0] is d:
            raise ValueError(f"{d.text}: cannot match {hits[0].text}, itself rate-matched")
        out[d.text] = hits[0].text
    return out


def encoding_order(defenses: tuple[Spec, ...]) -> tuple[Spec, ...]:
    """Matched defenses before the ones that match them; otherwise as given."""
    matches = resolve_matches(defenses)
    return tuple(d for d in defenses if d.text not in matches) + tuple(d for d in defenses if d.text in matches)


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


class _EncodeFn(beam.DoFn):
    def __init__(self, defenses: tuple[Spec, ...], map_model: str, save_maps: bool):
        self.order = encoding_order(defenses)
        self.matches = resolve_matches(defenses)
        self.map_model = map_model
        self.save_maps = save_maps
        self.ok = Metrics.counter("semjpeg", "encoded")
        self.failed = Metrics.counter("semjpeg", "encode_errors")

    def process(self, v: Variant):
        s = v.sample
        sizes: dict[str, int] = {}
        denoised, prepared = v.denoised, v.prepared
        if denoised or prepared:  # only this stage needs them: later stages carry the variant without
            v = dataclasses.replace(v, denoised={}, prepared={})
        for spec in self.order:
            req = map_request(spec)
            if req and req[0] not in v.maps:
                continue  # its map failed on this variant: reported by the saliency stage
            try:
                saliency = v.maps[req[0]] if req else None
                matched = None
                if spec.text in self.matches:
                    ref = self.matches[spec.text]
                    if ref not in sizes:
                        raise ValueError(f"the matched defense {ref} failed on this image")
                    matched = sizes[ref]
                enc = apply_defense(spec, v.image, saliency=saliency, matched_bytes=matched,
                                    denoised=denoised.get(denoise_weight(spec)), prepared=prepared.get(spec.text),
                                    **(v.map_stability.get(req[0], {}) if req else {}))
                # PNG is lossless: the stored pixels are the input pixels.
                decoded = v.image if enc.ext == "png" else decode_rgb(enc.data)
                data = with_colour_profile(enc.data, enc.ext, s.profile)
            except Exception as e:
                self.failed.inc()
                log.warning("defense %s failed on %s: %s", spec.text, s.key, e)
                yield ErrorRecord(s.source_index, s.source, s.key, None, "encode", error_reason(e),
                                  v.attack.text, spec.text)
                continue
            # Sizes, budgets and the row's bytes are the image's coded data's, as without a profile.
            sizes[spec.text] = len(enc.data)
            extra = dict(enc.info)
            extra["profile_bytes"] = (len(data) - len(enc.data)) or None
            if "quality_levels" in extra:
                extra["quality_levels"] = [{"quality": q, "blocks": n} for q, n in extra["quality_levels"].items()]
            members = {}
            if req:
                extra["map_model"] = self.map_model
                extra["map_seconds"] = v.map_seconds.get(req[0])
                if self.save_maps:
                    members["map.png"] = _png(heatmap(saliency))
            self.ok.inc()
            yield Defended(v, spec, data, enc.ext, decoded, extra, members)


class EncodeDefenses(beam.PTransform):
    """Variant (with maps) -> (Defended PCollection, ErrorRecord PCollection)."""

    def __init__(self, defenses: tuple[Spec, ...], *, map_model: str = "", save_maps: bool = False):
        super().__init__()
        self.fn = _EncodeFn(defenses, map_model, save_maps)

    def expand(self, variants):
        return variants | "Encode" >> beam.ParDo(self.fn) | "Split" >> SplitErrors()
