from __future__ import annotations

import fsspec
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import EvaluateConfig, InputConfig, ModelConfig, parse_attacks, parse_defenses


@pytest.fixture
def fnapi():
    return PipelineOptions(["--runner", "FnApiRunner"])


def tiny_config(inputs, output, *, attacks=("fgsm:eps=4/255",), defenses=("jpeg:quality=50",), **kw) -> EvaluateConfig:
    inp = {k: kw.pop(k) for k in list(kw) if k in InputConfig.__dataclass_fields__}
    return EvaluateConfig(
        input=InputConfig(paths=tuple(inputs), resize=72, crop=64, **inp),
        output=str(output),
        model=ModelConfig(name="tests.tiny:build", batch_size=4, device="cpu"),
        attacks=parse_attacks(list(attacks)),
        defenses=parse_defenses(list(defenses)),
        **kw,
    )


class ObjectStore(MemoryFileSystem):
    """An object store as GCS and S3 are one: no directories (a prefix exists while a key is under
    it), a move is a copy of each object then its deletion; ``hook(op, path, source)`` runs before each
    copy (``cp``), deletion (``rm``) and file opened for writing (``write``)."""

    protocol = "objstore"
    store: dict = {}
    pseudo_dirs = [""]
    hook = None

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("objstore://"):
            path = path[len("objstore://"):]
        return super()._strip_protocol(path)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass

    def cp_file(self, path1, path2, **kwargs):
        if self.isdir(path1):
            return
        if self.hook:
            self.hook("cp", self._strip_protocol(path2), self._strip_protocol(path1))
        super().cp_file(path1, path2, **kwargs)

    def rm_file(self, path):
        if self.hook:
            self.hook("rm", self._strip_protocol(path), None)
        super().rm_file(path)

    def _open(self, path, mode="rb", **kwargs):
        if self.hook and "w" in mode:
            self.hook("write", self._strip_protocol(path), None)
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def objstore(monkeypatch):
    fsspec.register_implementation("objstore", ObjectStore, clobber=True)
    ObjectStore.store.clear()
    monkeypatch.setattr(ObjectStore, "hook", None)
    yield fsspec.filesystem("objstore")
    ObjectStore.store.clear()

