"""An in-memory stand-in for gcsfs, so gs:// paths go through the real etils.epath → fsspec code path without a
network: `with fake_gcs(monkeypatch) as fs:` (or the `gcs` fixture) registers it as fsspec's "gs"/"gcs" protocol.

Like a GCS bucket it has no append mode and its files have no fileno() (so no os.fsync); objects appear whole when
their writer closes."""
from __future__ import annotations

import sys

import fsspec  # noqa: F401 (loads fsspec.registry)
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # etils passes gcsfs's finalize_on_close
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.strip("/")

    def unstrip_protocol(self, name: str) -> str:
        return "gs://" + name

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"cannot append to gs://{self._strip_protocol(path)}: objects are immutable")
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
    """The fake gs:// filesystem (empty), registered for the test's duration (fsspec's registry, with etils'
    cached filesystem dropped before and after)."""
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.clear_instance_cache()
    for name in ("gs", "gcs"):
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, name, FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
