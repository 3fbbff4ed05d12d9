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

import asyncio
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sieve.atomic import atomic_path, sha256_file
from sieve.errors import ArtifactError

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
FORMAT = 1
_VERSION_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class ArtifactSet:
    """A loaded manifest and the folder it describes."""

    root: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def path(self, role: str) -> Path:
        """Absolute path of the file the manifest names for ``role``."""
        try:
            return self.root / self.manifest["files"][role]["path"]
        except KeyError:
            raise ArtifactError(f"{self.root / MANIFEST} names no {role!r} file") from None

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
        expected = self.manifest["files"][role]["sha256"]
        if sha256_file(path) != expected:
            raise ArtifactError(f"{role} file {path} does not match its checksum in {MANIFEST}")
        problem = _format_problem(path)
        if problem:
            raise ArtifactError(f"{role} file {path} is malformed: {problem}")
        return path


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


def file_entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file, then ``os.replace``)."""
    target = Path(version_dir) / MANIFEST
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target


def clone_version(src: Path, dest: Path, link: bool = False) -> Path:
    """``dest``: the set in version folder ``src`` again, its manifest's version set
    to ``dest.name`` (how a rebuild of the same inputs looks to the services); not
    published. ``link``: hard links instead of copies (instant at 1M items), so a
    file of the clone must then be replaced, never written in place."""
    shutil.copytree(src, dest, copy_function=os.link if link else shutil.copy2)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["version"] = dest.name
    write_manifest(dest, manifest)  # a new file: a link is replaced, not written through
    return dest


def publish(root: Path, version: str) -> None:
    """Point ``root/CURRENT`` at ``version``, atomically."""
    if not _VERSION_RE.match(version):
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
    if not _VERSION_RE.match(version):
        raise ArtifactError(f"{current} holds {version!r}, not a version name")
    folder = root / "versions" / version
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder / MANIFEST} is missing ({current} points at it)")
    return folder


def current_version(root: Path) -> str:
    """The version the live set under ``root`` has (what ``CURRENT`` names)."""
    folder = resolve(root)
    return folder.name if folder != Path(root) else load(root).version


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Check the shape of a manifest whose required keys are present: a version
    name, sections that are objects, and a files table whose every entry names a
    path inside the set and a SHA-256.

    Raises:
        ArtifactError: naming ``path`` and the key that is wrong.
    """
    version = manifest["version"]
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ArtifactError(f"{path}: 'version' is {version!r}, not a version name")
    for key in ("files", "index", "model", "feature_schema"):
        if not isinstance(manifest[key], dict):
            raise ArtifactError(
                f"{path}: {key!r} is a {type(manifest[key]).__name__}, not an object"
            )
    for role, entry in manifest["files"].items():
        where = f"{path}: files[{role!r}]"
        if not isinstance(entry, dict):
            raise ArtifactError(f"{where} is a {type(entry).__name__}, not an object")
        rel, digest = entry.get("path"), entry.get("sha256")
        if not isinstance(rel, str) or not rel:
            raise ArtifactError(f"{where} has no 'path' string")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ArtifactError(f"{where} has no 'sha256' of 64 hex digits")
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or "\\" in rel or ".." in parts:
            raise ArtifactError(f"{where} names {rel!r}, a path outside the artifact set")


def load(root: Path, version: str | None = None) -> ArtifactSet:
    """Read and sanity-check the manifest of an artifact set under ``root``: the live
    one (what ``CURRENT`` names), or ``versions/<version>`` when ``version`` is given
    (a reload names the version it read from ``CURRENT``, so a publish in between
    cannot switch sets under it).

    Raises:
        ArtifactError: missing or unreadable manifest, a manifest of another format,
            one whose version is not the folder's (or ``version``), or one whose
            keys have the wrong types or whose files leave the set
            (``_check_manifest``).
    """
    if version is None or (Path(root) / MANIFEST).is_file():
        folder = resolve(root)
    elif not _VERSION_RE.match(version):
        raise ArtifactError(f"{version!r} is not a version name")
    else:
        folder = Path(root) / "versions" / version
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a sieve manifest of format {FORMAT}")
    for key in ("version", "files", "index", "model", "feature_schema"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks {key!r}")
    _check_manifest(path, manifest)
    # A set under versions/ is of its folder's version, whoever names it.
    expected = folder.name if folder != Path(root) else version
    if expected is not None and manifest["version"] != expected:
        raise ArtifactError(f"{path} is of version {manifest['version']!r}, not {expected!r}")
    return ArtifactSet(root=folder, manifest=manifest)


async def release_off_loop(held: list[Any]) -> None:
    """Drop the references in ``held`` (the caller's last ones) on a worker thread,
    so what they free is freed there. A retired 1M-item index takes 25 ms to free
    here, and its destructor releases the GIL: freed on the event loop, it would
    stall every call for that long at each swap."""
    await asyncio.to_thread(held.clear)
