"""The versioned artifact set: index, model and feature schema that belong together.

Layout under an artifacts root::

    CURRENT                      the live version's name (written atomically)
    versions/<version>/
        manifest.json            names every file below with its SHA-256
        index.faiss  catalog.parquet  user_vectors.npz  ranker.onnx
        feature_repo/            a Feast repo: feature_store.yaml, repo.py, data/, registry.db

Services resolve ``CURRENT`` once at load and verify the checksums of the files
they read, so a half-written or tampered set is refused naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sieve.atomic import atomic_path, sha256_file
from sieve.errors import ArtifactError
from sieve.manifest import FORMAT, VERSION_RE, FileEntry, Manifest, problem

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "manifest.json"
CURRENT = "CURRENT"


@dataclass(frozen=True)
class ArtifactSet:
    """A loaded manifest and the folder it describes."""

    root: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    def path(self, role: str) -> Path:
        """Absolute path of the file the manifest names for ``role``."""
        entry = self.manifest.files.get(role)
        if entry is None:
            raise ArtifactError(f"{self.root / MANIFEST} names no {role!r} file")
        return self.root / entry.path

    def verified(self, role: str) -> Path:
        """``path(role)``, after checking it exists, matches its checksum and, for
        the formats sieve reads whole (``.npy``, ``.parquet``), that its header
        describes the file: a bad build whose checksum was taken of a truncated or
        garbled file is refused here, naming it, not deep inside numpy or Arrow.

        Raises:
            ArtifactError: naming the missing, corrupt or malformed file.
        """
        path = self.path(role)
        if not path.is_file():
            raise ArtifactError(f"{role} file {path} is missing")
        expected = self.manifest.files[role].sha256
        if sha256_file(path) != expected:
            raise ArtifactError(f"{role} file {path} does not match its checksum in {MANIFEST}")
        problem = _format_problem(path)
        if problem:
            raise ArtifactError(f"{role} file {path} is malformed: {problem}")
        return path

    def read_catalog(self, columns: Sequence[str]) -> pd.DataFrame:
        """The verified catalog's ``columns`` (``item_id`` first among them).

        Raises:
            ArtifactError: naming the file, when it lacks a column or cannot be read.
        """
        import pandas as pd
        import pyarrow as pa

        path = self.verified("catalog")
        try:
            catalog = pd.read_parquet(path, columns=list(columns))
            catalog["item_id"].to_numpy("int64")
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as e:
            raise ArtifactError(
                f"catalog file {path} has no readable {' and '.join(columns)} "
                f"column{'s' if len(columns) > 1 else ''}: {type(e).__name__}: {e}"
            ) from e
        return catalog


def _format_problem(path: Path) -> str:
    """What is wrong with the header of an ``.npy`` or ``.parquet`` file ("" when
    nothing is, or for other formats). Reads the header and footer only."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(f)
                offset = f.tell()
        except (ValueError, OSError, EOFError) as e:
            return f"not a .npy array ({e})"
        if dtype.hasobject:
            return f"holds Python objects ({dtype}), not numbers"
        size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        actual = path.stat().st_size
        if actual != size:
            return f"its header ({dtype} {shape}) needs {size} bytes, the file has {actual}"
        return ""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as e:
            return f"not a readable parquet file ({e})"
    return ""


def file_entry(root: Path, rel: str) -> FileEntry:
    path = root / rel
    return FileEntry(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size)


def write_manifest(version_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically (temp file, then ``os.replace``)."""
    target = Path(version_dir) / MANIFEST
    with atomic_path(target) as tmp:
        tmp.write_text(manifest.to_json())
    return target


def clone_version(src: Path, dest: Path, link: bool = False) -> Path:
    """``dest``: the set in version folder ``src`` again, its manifest's version set
    to ``dest.name`` (how a rebuild of the same inputs looks to the services); not
    published. ``link``: hard links instead of copies (instant at 1M items), so a
    file of the clone must then be replaced, never written in place."""
    shutil.copytree(src, dest, copy_function=os.link if link else shutil.copy2)
    manifest = Manifest.model_validate_json((dest / MANIFEST).read_text())
    # a new file: a link is replaced, not written through
    write_manifest(dest, manifest.model_copy(update={"version": dest.name}))
    return dest


def publish(root: Path, version: str) -> None:
    """Point ``root/CURRENT`` at ``version``, atomically."""
    if not VERSION_RE.match(version):
        raise ValueError(f"bad artifact version {version!r}")
    with atomic_path(Path(root) / CURRENT) as tmp:
        tmp.write_text(version + "\n")


def resolve(root: Path) -> Path:
    """The version folder ``root/CURRENT`` points at (or ``root`` itself if it holds
    a manifest directly).

    Raises:
        ArtifactError: naming what is missing.
    """
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    current = root / CURRENT
    if not current.is_file():
        raise ArtifactError(f"{current} is missing: no artifact set was built in {root}")
    version = current.read_text().strip()
    if not VERSION_RE.match(version):
        raise ArtifactError(f"{current} holds {version!r}, not a version name")
    folder = root / "versions" / version
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder / MANIFEST} is missing ({current} points at it)")
    return folder


def current_version(root: Path) -> str:
    """The version the live set under ``root`` has (what ``CURRENT`` names)."""
    folder = resolve(root)
    return folder.name if folder != Path(root) else load(root).version


def load(root: Path, version: str | None = None) -> ArtifactSet:
    """Read and sanity-check the manifest of an artifact set under ``root``: the live
    one (what ``CURRENT`` names), or ``versions/<version>`` when ``version`` is given
    (a reload names the version it read from ``CURRENT``, so a publish in between
    cannot switch sets under it).

    Raises:
        ArtifactError: missing or unreadable manifest, a manifest of another format,
            one whose version is not the folder's (or ``version``), or one whose
            fields do not fit ``Manifest`` (named by their path) or whose files
            leave the set.
    """
    if version is None or (Path(root) / MANIFEST).is_file():
        folder = resolve(root)
    elif not VERSION_RE.match(version):
        raise ArtifactError(f"{version!r} is not a version name")
    else:
        folder = Path(root) / "versions" / version
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a sieve manifest of format {FORMAT}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        raise ArtifactError(f"{path}{problem(e)}") from None
    # A set under versions/ is of its folder's version, whoever names it.
    expected = folder.name if folder != Path(root) else version
    if expected is not None and manifest.version != expected:
        raise ArtifactError(f"{path} is of version {manifest.version!r}, not {expected!r}")
    return ArtifactSet(root=folder, manifest=manifest)
