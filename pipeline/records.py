"""Element types that flow between the stages. Plain frozen dataclasses: Beam pickles them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transforms.specs import Spec


@dataclass(frozen=True)
class SourceShard:
    """One unit of reading: a tar or Parquet file, or a chunk of a folder's files."""

    index: int
    path: str
    format: str  # webdataset | parquet | folder
    files: tuple[str, ...] = ()  # folder chunks: the files, relative to ``path``


@dataclass(frozen=True)
class RawSample:
    """Undecoded sample as read from a shard."""

    source_index: int
    source: str
    key: str
    member: str  # tar member, Parquet row or file the image came from
    data: bytes
    label: str | None = None  # raw label text, parsed by DecodeImages
    meta: bytes | None = None  # raw JSON sidecar


@dataclass(frozen=True)
class Sample:
    """Decoded sample: uint8 HWC RGB at the crop size (at its own size with ``--crop 0``)."""

    source_index: int
    source: str
    key: str
    label: int | None
    image: np.ndarray
    meta: dict[str, Any] | None = None
    #: The ICC profile the pixels are in, embedded in the files written from them; None for sRGB
    #: (``transforms.images.carried_profile``).
    profile: bytes | None = None

    @property
    def identity(self) -> str:
        """What seeds this sample's random numbers: its shard's file (or folder) name and its key,
        not the shard's full path, so a dataset draws the same numbers wherever it is stored
        (another folder, a bucket)."""
        return self.source.rstrip("/").rsplit("/", 1)[-1] + "/" + self.key


@dataclass(frozen=True)
class Variant:
    """One attacked (or clean) version of a sample, with the attack's own measures."""

    sample: Sample
    attack: Spec
    image: np.ndarray
    clean_pred: int
    success: bool | None = None
    target: int | None = None
    iterations: int = 0
    seconds: float = 0.0
    linf: float = 0.0
    l2: float = 0.0
    rmse: float = 0.0
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # map request -> (H, W) float32 in [0, 1]
    map_seconds: dict[str, float] = field(default_factory=dict)
    #: map request -> the image's prediction stabilities and noise level ({"stability": s,
    #: "jpeg_stability": j, "noise_level": n}), for the requests that measure them (the hidden
    #: defense parameters of the same names).
    map_stability: dict[str, dict[str, float]] = field(default_factory=dict)
    #: TV weight -> the image denoised at that weight (uint8 HWC), for the images an
    #: ``aug_msroi_gated`` defense flags: denoised in the map stage, on the map model's device.
    denoised: dict[float, np.ndarray] = field(default_factory=dict)
    #: defense spec text -> its semantic JPEG's quality grid, coefficients and tables
    #: (``transforms.defenses.Prepared``), computed in the map stage on a GPU: the encoder writes them.
    prepared: dict[str, Any] = field(default_factory=dict)
    #: The classifier's softmax (K,) float32 on ``image``, from the attack stage, which classifies
    #: every variant anyway (the clean prediction, an attack's success). The classify stage
    #: reuses it for defenses that store ``image`` losslessly instead of running the model again.
    probs: np.ndarray | None = None


@dataclass(frozen=True)
class Defended:
    """A variant after a defense: the stored bytes and the pixels a consumer decodes from them."""

    variant: Variant
    defense: Spec
    data: bytes
    ext: str
    decoded: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)  # defense-specific metadata columns
    members: dict[str, bytes] = field(default_factory=dict)  # extra shard members by extension


@dataclass(frozen=True)
class Result:
    """One metadata row and the stored bytes it describes."""

    source_index: int
    key: str
    row: dict[str, Any]
    data: bytes
    ext: str
    label: int | None = None
    meta: dict[str, Any] | None = None  # the input's JSON sidecar, carried into the shards
    members: dict[str, bytes] = field(default_factory=dict)  # extra shard members by extension


@dataclass(frozen=True)
class ErrorRecord:
    """An input that could not be processed at some stage, and why."""

    source_index: int
    source: str
    key: str | None
    member: str | None
    stage: str
    reason: str
    attack: str | None = None
    defense: str | None = None

    def as_row(self, run_id: str) -> dict[str, Any]:
        return {
            "key": self.key, "member": self.member, "source": self.source, "stage": self.stage,
            "reason": self.reason, "attack_spec": self.attack, "defense_spec": self.defense,
            "run_id": run_id,
        }
