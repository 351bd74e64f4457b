"""Job configurations: one frozen dataclass per job, validated on construction.

Errors name the bad value; the jobs turn them into one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import datetime as _dt
import functools
import math
import re
import secrets
from dataclasses import InitVar, dataclass, field

from transforms.attacks import ATTACKS, CLEAN, check_values, parse_attack
from transforms.defenses import DEFENSES, HIDDEN, parse_defense
from transforms.images import DEFAULT_MAX_PIXELS
from transforms.models import MEMORY_FORMATS, model_info
from transforms.specs import Spec, spec_params

from .io import check_run_id

INPUT_FORMATS = ("auto", "webdataset", "parquet", "folder")
ATTACK_LABELS = ("pred", "label")


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable and unique."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class InputConfig:
    """Where the images come from and how they are decoded.

    paths: globs, files or folders (any fsspec URL). format: ``auto`` tells by extension
    (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tbz2``, ``.tar.xz``, ``.txz`` WebDataset, ``.parquet`` or
    ``.pq`` Parquet, a folder of images).
    Parquet columns are named by ``image_column``/``key_column``/``label_column``; key and label
    columns are optional when left None (the ``key`` and ``label`` columns if a file has them) and
    required when named. A folder may come with ``labels_csv`` (``file,label``) and is read
    ``folder_shard_size`` files per shard.
    Decoding resizes the shorter side to ``resize`` and center-crops ``crop`` x ``crop``;
    ``crop=0`` (with ``resize=0``) keeps every image at its own size (see EvaluateConfig.native).
    """

    paths: tuple[str, ...]
    format: str = "auto"
    image_column: str = "image"
    key_column: str | None = None
    label_column: str | None = None
    labels_csv: str | None = None
    folder_shard_size: int = 1000
    resize: int = 256
    crop: int = 224
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        object.__setattr__(self, "paths", tuple(self.paths))
        if not self.paths:
            raise ValueError("no --input given")
        if any(not p.strip() for p in self.paths):
            raise ValueError(f"--input must not be empty, got {list(self.paths)!r}")
        if self.format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {self.format!r}; valid: {', '.join(INPUT_FORMATS)}")
        _positive("folder shard size", self.folder_shard_size)
        if self.crop != 0:
            _positive("crop", self.crop, minimum=16)
        _positive("resize", self.resize, minimum=0)
        if self.crop == 0 and self.resize:
            raise ValueError(f"resize ({self.resize}) needs a crop: --crop 0 keeps images at their own size")
        if self.resize and self.resize < self.crop:
            raise ValueError(f"resize ({self.resize}) must be 0 or at least the crop ({self.crop})")
        _positive("max pixels", self.max_pixels)
        for col, optional in (("image_column", False), ("key_column", True), ("label_column", True)):
            value = getattr(self, col)
            if not value and not (optional and value is None):
                raise ValueError(f"{col.replace('_', ' ')} must not be empty")


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: a registry name, optional weights URL, device, batch size, torch threads,
    and the weights' memory format (``auto``: channels_last on the CPU; see
    :func:`transforms.models.memory_format`). ``weights_option`` (not stored) is how the missing
    weights are asked for: ``--map-weights`` for a ``--map-model``, a nightly config's own key."""

    name: str = "efficientnet_lite0"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 16
    torch_threads: int | None = None
    memory_format: str = "auto"
    weights_option: InitVar[str] = "--weights"

    def __post_init__(self, weights_option: str):
        info = model_info(self.name)  # raises listing the valid names
        if info.needs_weights and not self.weights:
            raise ValueError(
                f"model {self.name!r} needs {weights_option} (a state-dict path or URL); "
                "nothing is downloaded at run time"
            )
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        _positive("batch size", self.batch_size)
        if self.torch_threads is not None:
            _positive("torch threads", self.torch_threads)
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory format must be one of {', '.join(MEMORY_FORMATS)}, got {self.memory_format!r}")

    @property
    def num_classes(self) -> int:
        return model_info(self.name).num_classes


def parse_attacks(texts: tuple[str, ...] | list[str]) -> tuple[Spec, ...]:
    """``clean`` first, then the given attacks; rejects duplicates and folder-name clashes."""
    specs = [Spec(CLEAN, {}, CLEAN)] + [parse_attack(t) for t in texts if t.strip().lower() != CLEAN]
    return _unique(specs, "attack")


def parse_defenses(texts: tuple[str, ...] | list[str], *, reference: bool = True) -> tuple[Spec, ...]:
    """``none`` first (the undefended reference) unless ``reference=False``, then the given
    defenses; ``jpeg:match=...`` references are checked."""
    from .encode import resolve_matches

    given = [parse_defense(t) for t in texts if not reference or t.strip().lower() != "none"]
    specs = ([parse_defense("none")] if reference else []) + given
    specs = _unique(specs, "defense")
    resolve_matches(specs)
    return specs


def spec_identity(spec: Spec, kind: str, value=lambda key, v: repr(v)) -> tuple:
    """The spec as it runs: its name and every parameter's ``value(key, v)`` (by default its
    repr), the defaults filled in, so ``jpeg`` and ``jpeg:quality=75`` are one spec."""
    fn = (ATTACKS if kind == "attack" else DEFENSES).get(spec.name)
    defaults = {} if fn is None else {k: p.default for k, p in spec_params(fn).items() if k not in HIDDEN}
    values = {**defaults, **spec.params}
    return spec.name, tuple(sorted((k, value(k, v)) for k, v in values.items()))


#: Parameters whose value is itself a defense spec (``;`` separating its own parameters).
_NESTED_DEFENSES = ("bpda", "match")


def _canonical_value(key: str, value):
    if isinstance(value, float):
        return float(f"{value:.12g}") if math.isfinite(value) else repr(value)
    if key in _NESTED_DEFENSES and isinstance(value, str):  # a parsed bpda= has ',' (';' only in its match=)
        return spec_key(value.replace(";", ",") if key == "match" else value, "defense")
    return value if isinstance(value, (bool, int, str, type(None))) else repr(value)


@functools.lru_cache(maxsize=4096)
def spec_key(text: str, kind: str) -> tuple:
    """A spec text's identity, however it is spelled: its name and every parameter's value, the
    defaults filled in, numbers as numbers and floats rounded to 12 significant digits, so
    ``fgsm:eps=4/255`` and ``fgsm:eps=0.01568627450980392`` are one key, as are ``jpeg``,
    ``jpeg:quality=75`` and ``jpeg:quality=075``. Nightly history is matched between nights by it.
    A text that no longer parses (a spec of an earlier version) is its own key."""
    parse = parse_attack if kind == "attack" else parse_defense
    try:
        spec = parse(text)
    except ValueError:
        return ("text", text.strip())
    return spec_identity(spec, kind, _canonical_value)


def _unique(specs: list[Spec], kind: str) -> tuple[Spec, ...]:
    seen: dict[tuple, str] = {}
    folders: dict[str, str] = {}
    for s in specs:
        ident = spec_identity(s, kind)
        if ident in seen:
            raise ValueError(f"duplicate {kind} spec {s.text!r} (same as {seen[ident]!r})")
        seen[ident] = s.text
        if s.folder in folders:
            raise ValueError(f"{kind} specs {folders[s.folder]!r} and {s.text!r} would share a folder")
        folders[s.folder] = s.text
    return tuple(specs)


#: Precisions of the saliency-map stage: float32, or bfloat16 autocast with channels_last.
MAP_PRECISIONS = ("fp32", "bf16")


def check_map_precision(value) -> str:
    if value not in MAP_PRECISIONS:
        raise ValueError(f"map precision must be one of {', '.join(MAP_PRECISIONS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class EvaluateConfig:
    """`semjpeg evaluate` and `semjpeg attack`: attacks x defenses over every input.

    ``layout="attack"`` writes ``shards/<attack>/`` (the adversarial-set product) and
    ``layout="defend"`` ``shards/<defense>/`` (the defended set) instead of
    ``shards/<attack>/<defense>/``. ``attack_labels``: attack the clean prediction (``pred``, the
    paper's protocol and the default) or the dataset label where known (``label``). Saliency
    maps come from ``map_model`` (default: the classifier), in ``map_precision`` (``fp32``, or
    ``bf16``: bfloat16 autocast with channels_last, for GPUs), compiled where ``map_compile``
    (``transforms.saliency.compile_plain_passes``); ``save_maps`` stores each map as a
    PNG heatmap (``<key>.map.png``) beside the image in the shards.
    """

    input: InputConfig
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    attacks: tuple[Spec, ...] = field(default_factory=lambda: parse_attacks([]))
    defenses: tuple[Spec, ...] = field(default_factory=lambda: parse_defenses([]))
    seed: int = 0
    attack_labels: str = "pred"
    layout: str = "evaluate"
    run_id: str = field(default_factory=new_run_id)
    map_model: ModelConfig | None = None
    save_maps: bool = False
    map_precision: str = "fp32"
    map_compile: bool = False

    def __post_init__(self):
        check_map_precision(self.map_precision)
        if not isinstance(self.map_compile, bool):
            raise ValueError(f"map_compile must be true or false, got {self.map_compile!r}")
        if not self.output or not str(self.output).strip():
            raise ValueError("no --output given")
        if not self.attacks or self.attacks[0].name != CLEAN:
            raise ValueError("attacks must start with clean (use parse_attacks)")
        if not self.defenses:
            raise ValueError("no defense given")
        if self.layout != "defend" and self.defenses[0].name != "none":
            raise ValueError("defenses must start with none (use parse_defenses)")
        if self.attack_labels not in ATTACK_LABELS:
            raise ValueError(f"attack labels must be one of {', '.join(ATTACK_LABELS)}, got {self.attack_labels!r}")
        if self.layout not in ("evaluate", "attack", "defend"):
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.layout == "attack" and len(self.defenses) != 1:
            raise ValueError("the attack layout stores undefended images only")
        if self.layout == "defend" and len(self.attacks) != 1:
            raise ValueError("the defend layout defends its inputs as they are (no attacks)")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.native and len(self.attacks) > 1:
            raise ValueError("--crop 0 (images at their own size) works without attacks only (semjpeg defend, or "
                             "evaluate without --attack): attacks run at the model's input size")
        for spec in self.attacks:  # a target class must be one the model has
            check_values(spec, self.model.num_classes)
        check_run_id(self.run_id)

    @property
    def native(self) -> bool:
        """Images at their own size (``crop=0``): the model sees each through its own
        preprocessing (resize, center crop) for predictions, and the whole image squashed to its
        input size for saliency maps, whose map is then stretched back over the image; the
        defenses encode, and PSNR/SSIM compare, the full image."""
        return self.input.crop == 0

    @property
    def maps(self) -> ModelConfig:
        """The model that draws the saliency maps."""
        return self.map_model or self.model

    def describe(self) -> dict:
        """JSON-ready configuration for summary.json."""
        return {
            "inputs": list(self.input.paths),
            "input_format": self.input.format,
            "output": self.output,
            "model": self.model.name,
            "weights": self.model.weights,
            "batch_size": self.model.batch_size,
            "memory_format": self.model.memory_format,
            "attacks": [s.text for s in self.attacks],
            "defenses": [s.text for s in self.defenses],
            "map_model": self.maps.name,
            "map_precision": self.map_precision,
            "map_compile": self.map_compile,
            "save_maps": self.save_maps,
            "seed": self.seed,
            "attack_labels": self.attack_labels,
            "resize": self.input.resize,
            "crop": self.input.crop,
            "run_id": self.run_id,
            "layout": self.layout,
        }
