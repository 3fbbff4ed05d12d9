"""Malformed and truncated artifact files: refused at load, naming the file and what
is wrong, while the last good set keeps serving.

Every file a service reads is damaged two ways: after the manifest was written
(``stale``: the checksum catches it) and in a bad build whose manifest holds the
damaged file's checksum (``rebuilt``: the loader's own parsing must refuse it with
an ``ArtifactError``, not a raw Faiss, ONNX Runtime, Arrow, numpy or JSON error, nor
a crash). Each case is checked at start (``create_server`` raises) and on hot
reload (a running pair of servers refuses the new set and answers from the old).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import pytest_asyncio

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.service import create_server as create_ranker
from sieve import artifacts
from sieve.errors import ArtifactError
from sieve.grpc_server import Server
from sieve.manifest import Manifest
from tests.conftest import RELAXED, STATELESS, copy_artifacts, until

CANDIDATE, RANKER = "candidate", "ranker"
RELOAD_S = 0.1  # the reload check interval of the running pair
WAIT_S = 30.0  # the most a reload case waits for both services to decide


# --- damage: each takes the good file's bytes (and its path) and returns new bytes --


def truncated(data: bytes, path: Path) -> bytes:
    return data[: len(data) // 2]


def garbage(data: bytes, path: Path) -> bytes:
    return np.random.default_rng(len(data)).integers(0, 256, len(data), np.uint8).tobytes()


def huge_array(data: bytes, path: Path) -> bytes:
    """A Flat index whose codes claim 512 GiB: Faiss would try to allocate them."""
    assert data[:4] == b"IxFI", "the test set's index is Flat: this offset is its codes size"
    return data[:0x25] + struct.pack("<Q", 1 << 37) + data[0x2D:]


def without_item_id(data: bytes, path: Path) -> bytes:
    """A well-formed parquet file whose item id column has another name."""
    out = path.with_name("renamed.parquet")
    pd.read_parquet(path).rename(columns={"item_id": "id"}).to_parquet(out, index=False)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _npy(array: np.ndarray, path: Path) -> bytes:
    out = path.with_name("rewritten.npy")
    np.save(out, array)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def half_the_rows(data: bytes, path: Path) -> bytes:
    return _npy(np.load(path)[: len(np.load(path, mmap_mode="r")) // 2], path)


def other_dim(data: bytes, path: Path) -> bytes:
    return _npy(np.load(path)[:, :32], path)


def yaml_garbage(data: bytes, path: Path) -> bytes:
    return b"project: [unclosed\n\t: -"


# --- manifest damage: each takes the manifest text, the version folder and the good one


def json_truncated(text: str, folder: Path, good: Path) -> str:
    return text[: len(text) // 2]


def _edit(change: Callable[[dict[str, Any], Path, Path], None]) -> Callable[[str, Path, Path], str]:
    def edit(text: str, folder: Path, good: Path) -> str:
        manifest = json.loads(text)
        change(manifest, folder, good)
        return json.dumps(manifest)

    edit.__name__ = change.__name__
    return edit


@_edit
def lacks_files(m: dict[str, Any], folder: Path, good: Path) -> None:
    del m["files"]


@_edit
def entry_lacks_sha256(m: dict[str, Any], folder: Path, good: Path) -> None:
    del m["files"]["catalog"]["sha256"]


@_edit
def files_is_a_list(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["files"] = list(m["files"].values())


@_edit
def model_is_a_string(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["model"] = "ranker.onnx"


@_edit
def version_is_a_number(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["version"] = 7


@_edit
def version_not_the_folders(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["version"] = good.name  # a copy of the good set's manifest, left unedited


@_edit
def path_up_and_out(m: dict[str, Any], folder: Path, good: Path) -> None:
    # a real file with its real checksum, but another set's
    m["files"]["catalog"]["path"] = f"../{good.name}/catalog.parquet"


@_edit
def absolute_path(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["files"]["catalog"]["path"] = str(good / "catalog.parquet")


@_edit
def bad_search_params(m: dict[str, Any], folder: Path, good: Path) -> None:
    m["index"]["search_params"] = "nprobe=lots"


@_edit
def model_lacks_features(m: dict[str, Any], folder: Path, good: Path) -> None:
    del m["model"]["features"]


# --- the cases -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad set: ``role``'s file damaged by ``damage`` (or the manifest by
    ``edit``), refused by ``services`` with a message matching ``what``."""

    name: str
    services: tuple[str, ...]
    what: str  # regex after the file's path
    role: str = ""
    damage: Callable[[bytes, Path], bytes] | None = None
    rebuilt: bool = False  # the manifest holds the damaged file's checksum
    edit: Callable[[str, Path, Path], str] | None = None
    xfail: dict[str, str] = field(default_factory=dict)  # service -> reason
    config: dict[str, Any] = field(default_factory=dict)  # ranker config for this role

    def named(self, folder: Path) -> Path:
        if self.edit is not None:
            return folder / artifacts.MANIFEST
        rel = json.loads((folder / artifacts.MANIFEST).read_text())["files"][self.role]["path"]
        return folder / rel

    def message(self, folder: Path) -> str:
        return re.escape(str(self.named(folder))) + self.what


def _file_cases(
    role: str,
    services: tuple[str, ...],
    rebuilt: dict[str, tuple[Callable[[bytes, Path], bytes], str]],
    xfail: dict[str, dict[str, str]] | None = None,
    config: dict[str, Any] | None = None,
) -> list[Case]:
    stale = Case(
        f"{role}_truncated_stale",
        services,
        " does not match its checksum in manifest.json",
        role,
        truncated,
        config=config or {},
    )
    return [stale] + [
        Case(
            f"{role}_{name}_rebuilt",
            services,
            what,
            role,
            damage,
            rebuilt=True,
            xfail=(xfail or {}).get(name, {}),
            config=config or {},
        )
        for name, (damage, what) in rebuilt.items()
    ]


FAISS = " is not a readable Faiss index: .*"
PARQUET = " is malformed: not a readable parquet file"
ONNX = " is not a loadable ONNX model: "
CASES = [
    *_file_cases(
        "index",
        (CANDIDATE,),
        {
            "truncated": (truncated, FAISS + "read error"),
            "garbage": (garbage, FAISS + "not recognized"),
            "huge_array": (huge_array, FAISS + "deserialization_vector_byte_limit"),
        },
    ),
    *_file_cases(
        "user_vectors",
        (CANDIDATE,),
        {
            "truncated": (truncated, " is not readable: "),
            "garbage": (garbage, " is not readable: "),
        },
    ),
    *_file_cases(
        "catalog",
        (CANDIDATE, RANKER),
        {
            "truncated": (truncated, PARQUET),
            "garbage": (garbage, PARQUET),
            "without_item_id": (without_item_id, " has no readable item_id"),
        },
    ),
    *_file_cases(
        "item_embeddings",
        (RANKER,),
        {
            "truncated": (truncated, r" is malformed: its header \(float32 \(9742, 64\)\) needs"),
            "garbage": (garbage, " is malformed: not a .npy array"),
            "half_the_rows": (half_the_rows, r" has 4871 rows, the catalog 9742"),
            "other_dim": (other_dim, " .*dim"),
        },
    ),
    *_file_cases("text_index", (CANDIDATE,), {"truncated": (truncated, FAISS + "read error")}),
    *_file_cases(
        "text_embeddings",
        (RANKER,),
        {"half_the_rows": (half_the_rows, r" has shape \(4871, 384\), expected \(9742, 384\)")},
    ),
    *_file_cases(
        "item_neighbours",
        (RANKER,),
        {"half_the_rows": (half_the_rows, r" has shape \(4871, 50\), expected \(9742, 50\)")},
    ),
    *_file_cases("user_tower", (RANKER,), {"garbage": (garbage, " is not a loadable ONNX model")}),
    *_file_cases(
        "model",
        (RANKER,),
        {"truncated": (truncated, ONNX), "garbage": (garbage, ONNX)},
    ),
    *_file_cases(
        "model_int8",
        (RANKER,),
        {"truncated": (truncated, ONNX)},
        config={"model": "int8"},
    ),
    *_file_cases(
        "feature_store",
        (RANKER,),
        {"garbage": (yaml_garbage, " is not a valid feature_store.yaml: ")},
    ),
    *(
        Case(f"manifest_{edit.__name__}", services, what, edit=edit, xfail=xfail)
        for edit, services, what, xfail in [
            (json_truncated, (CANDIDATE, RANKER), " is not readable JSON: ", {}),
            (lacks_files, (CANDIDATE, RANKER), " lacks 'files'", {}),
            (entry_lacks_sha256, (CANDIDATE, RANKER), r": files\['catalog'\] lacks 'sha256'", {}),
            (files_is_a_list, (CANDIDATE, RANKER), ": 'files' is a list, not an object", {}),
            (model_is_a_string, (CANDIDATE, RANKER), ": 'model' is a str, not an object", {}),
            (version_is_a_number, (CANDIDATE, RANKER), ": 'version' is 7, not a version", {}),
            (version_not_the_folders, (CANDIDATE, RANKER), " is of version '.*', not 'zz_", {}),
            (path_up_and_out, (CANDIDATE, RANKER), r": files\['catalog'\] names '\.\./", {}),
            (absolute_path, (CANDIDATE, RANKER), r": files\['catalog'\] names '/.*outside", {}),
            (bad_search_params, (CANDIDATE,), ": index: search parameter nprobe must be", {}),
            (
                model_lacks_features,
                (CANDIDATE, RANKER),
                ": model lacks 'features'",
                {},
            ),
        ]
    ),
]
assert len({c.name for c in CASES}) == len(CASES)


def _params(per_service: bool) -> list[Any]:
    """One pytest param per case (``per_service``: per case and service that reads
    it; else per case the running pair's default config reads), xfail(strict) where
    the fix is due in a file this module may not change."""
    out = []
    for case in CASES:
        if per_service:
            for service in case.services:
                reason = case.xfail.get(service)
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                out.append(pytest.param(case, service, id=f"{service}-{case.name}", marks=marks))
        elif not case.config:  # the running pair serves the default config only
            reasons = "; ".join(case.xfail.values())
            marks = [pytest.mark.xfail(strict=True, reason=reasons)] if reasons else []
            out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def make_bad_version(root: Path, good: Path, case: Case) -> Path:
    """``root/versions/zz_<case>``: the good set's files hard-linked (a damaged file is
    replaced, never written through its link), then the case's damage."""
    folder = artifacts.clone_version(good, root / "versions" / f"zz_{case.name}", link=True)
    manifest_path = folder / artifacts.MANIFEST
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    if case.damage is not None:
        path = folder / manifest.files[case.role].path
        data = case.damage(path.read_bytes(), path)
        path.unlink()
        path.write_bytes(data)
        if case.rebuilt:
            entry = artifacts.file_entry(folder, path.relative_to(folder).as_posix())
            manifest = manifest.model_copy(update={"files": {**manifest.files, case.role: entry}})
    artifacts.write_manifest(folder, manifest)  # a new file: the link is replaced
    if case.edit is not None:
        text = case.edit(manifest_path.read_text(), folder, good)
        manifest_path.unlink()
        manifest_path.write_text(text)
    return folder


async def _start(service: str, root: Path, case: Case) -> Server:
    if service == CANDIDATE:
        server, _ = await create_candidate(CandidateConfig(port=0), root)
    else:
        server, _ = await create_ranker(RankerConfig(port=0, item_refresh_s=0, **case.config), root)
    return server


# --- at start ------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "service"), _params(per_service=True))
async def test_bad_set_is_refused_at_start_naming_the_file(
    case: Case, service: str, artifacts_root: Path, tmp_path: Path
) -> None:
    good = artifacts.resolve(artifacts_root)
    folder = make_bad_version(tmp_path, good, case)
    artifacts.publish(tmp_path, folder.name)
    try:
        server = await _start(service, tmp_path, case)
    except ArtifactError as e:
        assert re.search(case.message(folder), str(e)), str(e)
        return
    await server.stop(0)
    pytest.fail(f"{service} started with bad set {folder.name}")


# --- on hot reload: one running pair -------------------------------------------------


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.mark = 0  # where the current case's records start

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, logger: str, contains: str) -> list[str]:
        return [
            r.getMessage() for r in self.records if r.name == logger and contains in r.getMessage()
        ]


@dataclass
class Pair:
    root: Path
    good: str
    cservicer: Any
    pipeline: Any
    retrieve: sieve_pb2_grpc.CandidateServiceStub
    rank: sieve_pb2_grpc.RankerServiceStub
    logs: Records


async def _wait(condition: Callable[[], bool], what: str) -> None:
    await until(condition, WAIT_S, what)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(
    artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pair]:
    """A candidate and a ranker server on a good set, checking ``CURRENT`` every
    ``RELOAD_S``; their logs recorded."""
    root = copy_artifacts(artifacts_root, tmp_path_factory.mktemp("bad_reload"))
    logs = Records()
    loggers = [logging.getLogger(n) for n in ("candidate.service", "ranker.pipeline", "sieve")]
    for logger in loggers:
        logger.addHandler(logs)
        logger.setLevel(logging.INFO)
    cserver, cservicer = await create_candidate(
        CandidateConfig(port=0, reload_check_s=RELOAD_S), root
    )
    rconfig = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{cserver.port}",
        item_refresh_s=0,
        reload_check_s=RELOAD_S,
        rerank=STATELESS,
        reliability=RELAXED,
    )
    rserver, pipeline = await create_ranker(rconfig, root)
    cchannel = grpc.aio.insecure_channel(f"127.0.0.1:{cserver.port}")
    rchannel = grpc.aio.insecure_channel(f"127.0.0.1:{rserver.port}")
    try:
        yield Pair(
            root,
            artifacts.current_version(root),
            cservicer,
            pipeline,
            sieve_pb2_grpc.CandidateServiceStub(cchannel),
            sieve_pb2_grpc.RankerServiceStub(rchannel),
            logs,
        )
    finally:
        await cchannel.close()
        await rchannel.close()
        await rserver.stop(0)
        await cserver.stop(0)
        for logger in loggers:
            logger.removeHandler(logs)


def _outcome(pair: Pair, service: str, version: str) -> str:
    """What ``service`` made of ``version`` so far: "refused: <message>", "failed"
    (reload raised something other than an ArtifactError), "live", "pending", or
    "" (undecided)."""
    logger = "candidate.service" if service == CANDIDATE else "ranker.pipeline"
    refused = pair.logs.of(logger, f"refused artifact set {version}: ")
    if refused:
        return "refused: " + refused[0]
    failed = [r for r in pair.logs.records[pair.logs.mark :] if r.name == "sieve.grpc_server"]
    if failed:
        return f"failed: {failed[0].exc_info[1]!r}" if failed[0].exc_info else "failed"
    held = pair.cservicer.version if service == CANDIDATE else pair.pipeline.version
    if held == version:
        return "live"
    if service == RANKER and pair.logs.of(logger, f"ranker loaded {version} beside"):
        return "pending"  # loaded; goes live once the candidate holds it
    return ""


@pytest.mark.parametrize("case", _params(per_service=False))
async def test_bad_set_is_refused_on_reload_and_the_good_one_keeps_serving(
    case: Case, pair: Pair
) -> None:
    good = pair.root / "versions" / pair.good
    folder = make_bad_version(pair.root, good, case)
    pair.logs.mark = len(pair.logs.records)
    artifacts.publish(pair.root, folder.name)
    try:
        # Both decide (a service that reads none of the damaged files may load the
        # set), so no load is still running when the next case begins.
        await _wait(
            lambda: all(_outcome(pair, s, folder.name) for s in (CANDIDATE, RANKER)),
            f"both services deciding on {folder.name}",
        )
        for service in case.services:
            outcome = _outcome(pair, service, folder.name)
            assert outcome.startswith("refused: "), f"{service}: {outcome}"
            assert re.search(case.message(folder), outcome), outcome
            assert outcome.endswith(f"still serving {pair.good}"), outcome
        # The pair answers from the good set, whatever the service that reads none of
        # the damaged files made of it.
        rank = await pair.rank.Rank(sieve_pb2.RankRequest(user_id=42), timeout=30)
        assert rank.artifact_version == pair.good
        assert len(rank.items) == 50 and list(rank.degradations) == []
        assert pair.pipeline.version == pair.good
        if CANDIDATE in case.services:
            got = await pair.retrieve.Retrieve(sieve_pb2.RetrieveRequest(user_id=42, k=10))
            assert got.artifact_version == pair.good and len(got.item_ids) == 10
            assert pair.cservicer.version == pair.good
    finally:
        artifacts.publish(pair.root, pair.good)  # back to the good set for the next case
        await _wait(
            lambda: pair.cservicer.version == pair.good and pair.pipeline.version == pair.good,
            f"both services back on {pair.good}",
        )


async def test_files_no_service_reads_do_not_stop_a_set(pair: Pair) -> None:
    """The feature repo's offline parquet files (rewritten by every later
    materialization, so their build checksums go stale by design), the holdout
    and the teacher model are not read to serve: damaged, the set still goes live."""
    roles = ("user_features", "item_features", "holdout", "teacher")
    good = pair.root / "versions" / pair.good
    folder = make_bad_version(pair.root, good, Case("offline_only", (), ""))
    manifest = artifacts.load(pair.root, folder.name).manifest
    for role in roles:
        path = folder / manifest.files[role].path
        data = truncated(path.read_bytes(), path)
        path.unlink()
        path.write_bytes(data)
    artifacts.publish(pair.root, folder.name)
    try:
        await _wait(
            lambda: pair.pipeline.version == folder.name,
            f"both services going live with {folder.name}",
        )
        rank = await pair.rank.Rank(sieve_pb2.RankRequest(user_id=42), timeout=30)
        assert rank.artifact_version == folder.name and len(rank.items) == 50
    finally:
        artifacts.publish(pair.root, pair.good)
        await _wait(
            lambda: pair.cservicer.version == pair.good and pair.pipeline.version == pair.good,
            f"both services back on {pair.good}",
        )
