"""Property-based fuzzing of Rank and Retrieve over the real loopback servers.

Every request hypothesis draws is sent, and every answer must hold:

* the status is never INTERNAL or UNKNOWN (a request sieve could decode);
* INVALID_ARGUMENT only for a request with a bad field, and its message names one;
  a request whose fields are all valid is answered (Rank: OK; Retrieve: OK, or
  NOT_FOUND / FAILED_PRECONDITION for an unknown user / artifact version);
* an OK answer is well formed: Rank returns at most k distinct items, none excluded
  or seen; Retrieve at most k ids (all the valid items there are, up to k), as many
  scores, finite and best first, none excluded, all in the allowed categories.

Each hypothesis example is a batch of requests sent concurrently, so that the 10,000
requests of a run fit in about 65 s on 2 cores and the batching candidate
server sees good and bad requests in the same batch. Undecodable bytes and
messages over the 8 MiB receive limit are answered by grpc itself; the servers
must keep serving after them. Run with ``-s`` for the request count and the
status histogram; ``SIEVE_FUZZ_EXAMPLES`` sets the number of requests.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
import pytest_asyncio
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from candidate.config import CandidateConfig
from protos.sieve.v1 import sieve_pb2
from ranker.config import RankerConfig
from sieve import artifacts
from tests.fuzz.conftest import FUZZ, FUZZ_REQUESTS

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RANK = "/sieve.v1.RankerService/Rank"
RETRIEVE = "/sieve.v1.CandidateService/Retrieve"
MAX_RECEIVE = 8 << 20  # sieve/grpc_server.py: grpc.max_receive_message_length
BATCH = 48  # requests per hypothesis example, sent concurrently
# Share of FUZZ_REQUESTS per test, and the mean batch size each test's strategy
# draws (measured), giving its max_examples.
SHARES = {"rank": (0.25, 33.0), "retrieve": (0.60, 33.0), "garbage": (0.15, 33.0)}
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def examples(test: str) -> int:
    share, mean_batch = SHARES[test]
    return max(1, math.ceil(FUZZ_REQUESTS * share / mean_batch))


# ------------------------------------------------------------------- the world --


@dataclass(repr=False)
class World:
    """What the properties check answers against, read from the served artifact set."""

    version: str
    dim: int  # of the learned space (source "" or "learned")
    text_dim: int  # of the text space (source "text")
    item_ids: np.ndarray  # catalog order
    categories: dict[str, np.ndarray]  # genre -> bool mask over the catalog
    seen: dict[int, np.ndarray]  # known user -> seen item ids
    popular: list[int]  # catalog ids, most rated first: the ones answers hold
    rank_config: RankerConfig
    candidate_config: CandidateConfig

    def __repr__(self) -> str:
        return f"World(version={self.version!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # what hypothesis prints for a failing example


@dataclass
class Tally:
    """Requests sent, by (method, status), across the tests of this module."""

    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    ran: set[str] = field(default_factory=set)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return sum(self.codes.values())


TALLY = Tally()


@pytest.fixture(scope="module")
def world(artifact_set: artifacts.ArtifactSet, servers: dict[str, Any]) -> World:
    catalog = pd.read_parquet(artifact_set.verified("catalog"), columns=["item_id", "genres"])
    genres = catalog["genres"].fillna("").str.split("|")
    names = sorted({g for gs in genres for g in gs if g})
    users = pd.read_parquet(artifact_set.verified("user_features"))
    item_features = pd.read_parquet(artifact_set.verified("item_features"))
    popular = item_features.sort_values("log_popularity", ascending=False)["item_id"].head(400)
    emb = np.load(artifact_set.verified("item_embeddings"), mmap_mode="r")
    return World(
        version=servers["candidate_servicer"].version,
        dim=int(emb.shape[1]),
        text_dim=int(artifact_set.manifest.text_index.dim),  # type: ignore[union-attr]
        item_ids=catalog["item_id"].to_numpy(np.int64),
        categories={n: genres.map(lambda gs, n=n: n in gs).to_numpy(bool) for n in names},
        seen={
            int(u): np.asarray(s, np.int64)
            for u, s in zip(users["user_id"], users["seen_item_ids"], strict=True)
        },
        popular=[int(i) for i in popular],
        rank_config=servers["ranker_config"],
        candidate_config=CandidateConfig(),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def batched_candidate(artifacts_root: Path) -> AsyncIterator[str]:
    """A second candidate server that micro-batches (the GPU default; the fixture's
    CPU server does not), so bad and good requests share batches."""
    from candidate.service import create_server

    server, _ = await create_server(
        CandidateConfig(port=0, batching="on", batch_max_wait_us=1000, reload_check_s=0),
        artifacts_root,
    )
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channels(
    servers: dict[str, Any], batched_candidate: str
) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    chans = {
        "ranker": grpc.aio.insecure_channel(servers["ranker"]),
        "candidate": grpc.aio.insecure_channel(servers["candidate"]),
        "batched": grpc.aio.insecure_channel(batched_candidate),
    }
    yield chans
    for ch in chans.values():
        await ch.close()


# ------------------------------------------------------------------ strategies --


class Shown:
    """A drawn value with a short repr: hypothesis prints 20,000-id lists otherwise."""

    def __init__(self, value: Any, text: str) -> None:
        self.value, self.text = value, text

    def __repr__(self) -> str:
        return self.text


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of ``options``, picked with the given integer weights (shrinks to the first)."""
    table = [s for w, s in options for _ in range(w)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


def _many_ids(n: int, seed: int, pool: str, bad: str, known: Sequence[int]) -> Shown:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.asarray(known), n) if pool == "known" else rng.integers(1, INT64_MAX, n)
    if bad != "none" and n:
        ids[rng.integers(n)] = 0 if bad == "zero" else -int(rng.integers(1, INT64_MAX))
    return Shown(ids.tolist(), f"<{n} {pool} ids, {bad} bad, seed {seed}>")


def id_lists(known: Sequence[int], limit: int) -> st.SearchStrategy[Shown]:
    """Exclusion lists: empty; short ones of anything (int64 edges, zero, negatives);
    longer ones of ids the answers hold, with duplicates; a few around ``limit``.
    Lists past a handful of ids are built from a seed: drawing each id costs more
    than serving the request."""
    one = st.one_of(
        st.sampled_from(known),
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(-3, 3),
        st.sampled_from([INT64_MAX, INT64_MIN, 1, 193_609, 193_610]),
    )
    mixed = st.lists(one, max_size=6).map(lambda xs: Shown(xs, repr(xs)))
    same = st.builds(
        lambda x, n: Shown([x] * n, f"[{x}] * {n}"), st.sampled_from(known), st.integers(2, 50)
    )

    def seeded(sizes: st.SearchStrategy[int], bad: st.SearchStrategy[str]) -> st.SearchStrategy:
        pool = st.sampled_from(["known", "known", "any"])
        return st.builds(_many_ids, sizes, st.integers(0, 2**32 - 1), pool, bad, st.just(known))

    some = seeded(st.integers(1, 60), st.sampled_from(["none"] * 8 + ["zero", "negative"]))
    big = seeded(
        st.sampled_from([limit - 1, limit, limit + 1, limit // 2, 2 * limit]),
        st.sampled_from(["none", "none", "zero", "negative"]),
    )
    return weighted((8, st.just(Shown([], "[]"))), (4, mixed), (10, some), (1, same), (1, big))


def user_ids() -> st.SearchStrategy[int]:
    """Known MovieLens users (1..610) mostly, then unknown ones and int64 edges."""
    return weighted(
        (6, st.integers(1, 610)),
        (1, st.integers(611, 10**12)),
        (1, st.sampled_from([0, -1, 1, 610, 611, INT64_MIN, INT64_MAX])),
        (1, st.integers(INT64_MIN, INT64_MAX)),
    )


def ks(low: int, high: int, common: int) -> st.SearchStrategy[int]:
    """int32 k: mostly small valid ones (cheap to serve), the edges, anything."""
    return weighted(
        (16, st.integers(low, common)),
        (1, st.integers(low, high)),
        (1, st.sampled_from([0, -1, 1, high, high + 1, INT32_MIN, INT32_MAX])),
        (1, st.integers(INT32_MIN, INT32_MAX)),
    )


def _vector(kind: str, dim: int, seed: int, scale: float) -> Shown:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(dim).astype(np.float32)
    v /= max(float(np.linalg.norm(v)), 1e-12)
    if kind == "scaled":
        with np.errstate(over="ignore"):
            v = (v * np.float32(scale)).astype(np.float32)
    elif kind == "zero":
        v[:] = 0
    elif kind in ("nan", "inf", "-inf") and dim:
        v[rng.integers(dim)] = float(kind)
    elif kind == "const":
        v[:] = np.float32(scale)
    return Shown(v.tolist(), f"<{kind} vector of {dim}, scale {scale:g}, seed {seed}>")


def _patched(base: Shown, patches: list[tuple[int, float]]) -> Shown:
    v = list(base.value)
    for pos, x in patches:
        if v:
            v[pos % len(v)] = x
    return Shown(v, f"{base.text} with {patches}")


def vectors(dim: int) -> st.SearchStrategy[Shown]:
    built = st.builds(
        _vector,
        kind=st.sampled_from(
            ["unit"] * 6 + ["scaled", "scaled", "zero", "nan", "inf", "-inf", "const"]
        ),
        dim=weighted(
            (8, st.just(dim)),
            (1, st.sampled_from([0, 1, dim - 1, dim + 1, 2 * dim])),
            (1, st.integers(0, 4 * dim)),
        ),
        seed=st.integers(0, 2**32 - 1),
        scale=st.sampled_from([1.0, 1e-40, 1e-3, 1e10, 1e18, 1e19, 1e20, 1e30, 3e38, -3e38]),
    )
    # a few right-sized vectors with hypothesis-chosen floats at hypothesis-chosen places
    patched = st.builds(
        _patched,
        built,
        st.lists(st.tuples(st.integers(0, dim - 1), st.floats(width=32)), min_size=1, max_size=3),
    )
    return weighted((5, built), (1, patched))


def category_lists(known: Sequence[str]) -> st.SearchStrategy[list[str]]:
    odd = st.sampled_from(["", " ", "action", "ACTION", "Sci-Fi ", "Film-Noir|Western", "\x00"])
    long = st.builds(
        lambda c, n: c * n, st.characters(codec="utf-8"), st.sampled_from([100, 3000, 20_000])
    )
    return weighted(
        (8, st.just([])),
        (4, st.lists(st.sampled_from(known), min_size=1, max_size=3)),
        (2, st.lists(st.sampled_from(known) | odd | st.text(max_size=12), max_size=5)),
        (1, st.lists(long, min_size=1, max_size=2)),
    )


def versions(current: str) -> st.SearchStrategy[str]:
    long = st.builds(
        lambda c, n: c * n, st.characters(codec="utf-8"), st.sampled_from([100, 3000, 20_000])
    )
    return weighted(
        (10, st.just("")),
        (3, st.just(current)),
        (2, st.text(max_size=30)),
        (1, st.sampled_from([current + " ", current.upper(), "..", "../" + current, "CURRENT"])),
        (1, long),
    )


def _short(value: object, width: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}...<{len(text)} chars>"


@dataclass
class Call:
    """One request of a batch: the method, its message (or raw bytes), a short repr."""

    method: str
    request: Message | bytes
    text: str

    def __repr__(self) -> str:
        return f"{self.method.rsplit('/', 1)[1]}({self.text})"


def rank_calls(world: World) -> st.SearchStrategy[Call]:
    def make(user_id: int, k: int, exclude: Shown, debug: bool) -> Call:
        req = sieve_pb2.RankRequest(
            user_id=user_id, k=k, exclude_item_ids=exclude.value, debug=debug
        )
        return Call(RANK, req, f"user_id={user_id}, k={k}, exclude={exclude!r}, debug={debug}")

    return st.builds(
        make,
        user_ids(),
        ks(0, world.rank_config.max_k, 30),
        id_lists(world.popular, world.rank_config.max_exclude),
        st.booleans(),
    )


def retrieve_calls(world: World) -> st.SearchStrategy[Call]:
    def make(
        query: tuple[str, Any],
        k: int,
        exclude: Shown,
        allow: list[str],
        version: str,
        source: str,
        more: list[tuple[str, Any, int]],
    ) -> Call:
        req = sieve_pb2.RetrieveRequest(
            k=k,
            exclude_item_ids=exclude.value,
            allow_categories=allow,
            artifact_version=version,
            source=source,
        )
        for more_source, vector, more_k in more:
            m = req.more.add(source=more_source, k=more_k)
            if vector is not None:
                m.user_vector.values.extend(vector.value)
        kind, value = query
        if kind == "user_id":
            req.user_id = value
        elif kind == "user_vector":
            req.user_vector.values.extend(value.value)
        text = (
            f"{kind}={value!r}, k={k}, exclude={exclude!r}, "
            f"allow={_short(allow)}, version={_short(version)}, source={_short(source)}, "
            f"more={[(src, v, n) for src, v, n in more]!r}"
        )
        return Call(RETRIEVE, req, text)

    query = weighted(
        (1, st.just(("none", None))),
        (5, st.tuples(st.just("user_id"), user_ids())),
        (4, st.tuples(st.just("user_vector"), vectors(world.dim))),
        (2, st.tuples(st.just("user_vector"), vectors(world.text_dim))),
    )
    source = weighted(
        (6, st.just("")),
        (2, st.just("learned")),
        (3, st.just("text")),
        (1, st.text(max_size=12)),
    )
    more = st.tuples(
        source,
        weighted(
            (1, st.none()),
            (2, vectors(world.dim)),
            (4, vectors(world.text_dim)),
        ),
        ks(1, world.candidate_config.max_k, 100),
    )
    return st.builds(
        make,
        query,
        ks(1, world.candidate_config.max_k, 200),
        id_lists(world.popular, world.candidate_config.max_exclude),
        category_lists(sorted(world.categories)),
        versions(world.version),
        source,
        weighted((6, st.just([])), (3, st.lists(more, min_size=1, max_size=2))),
    )


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    b = bytearray(data)
    for pos, byte in edits:
        if b:
            b[pos % len(b)] = byte
    return bytes(b[: max(0, len(b) - cut)])


def garbage_calls(world: World) -> st.SearchStrategy[Call]:
    """Random bytes, and requests with bytes overwritten or cut off."""

    def plain(method: str, user_id: int, k: int, ids: list[int], allow: list[str]) -> Call:
        if method == RANK:
            req: Message = sieve_pb2.RankRequest(user_id=user_id, k=k, exclude_item_ids=ids)
        else:
            req = sieve_pb2.RetrieveRequest(
                user_id=user_id, k=k, exclude_item_ids=ids, allow_categories=allow
            )
        return Call(method, req, repr(req))

    valid = st.builds(
        plain,
        st.sampled_from([RANK, RETRIEVE]),
        user_ids(),
        ks(0, 2048, 200),
        st.lists(st.sampled_from(world.popular), max_size=5),
        st.lists(st.sampled_from(sorted(world.categories)), max_size=2),
    )

    def mutated(call: Call, edits: list[tuple[int, int]], cut: int) -> Call:
        assert isinstance(call.request, Message)
        data = _mutate(call.request.SerializeToString(), edits, cut)
        return Call(call.method, data, f"{data[:200]!r} (from {call.text[:200]})")

    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)
    raw = st.builds(
        lambda method, data: Call(method, data, repr(data)),
        st.sampled_from([RANK, RETRIEVE]),
        st.binary(max_size=120),
    )
    return weighted((1, raw), (1, st.builds(mutated, valid, edits, st.integers(0, 3) | st.just(0))))


# ------------------------------------------------------------------ properties --


async def send(channel: grpc.aio.Channel, call: Call) -> tuple[grpc.StatusCode, str, Any]:
    """Send one call; (status, details, response or None). Counted in TALLY."""
    identity: Callable[[Any], Any] | None = None
    if isinstance(call.request, bytes):
        stub = channel.unary_unary(call.method, request_serializer=identity)
    else:
        response = sieve_pb2.RankResponse if call.method == RANK else sieve_pb2.RetrieveResponse
        stub = channel.unary_unary(
            call.method,
            request_serializer=type(call.request).SerializeToString,
            response_deserializer=response.FromString,
        )
    try:
        resp = await stub(call.request, timeout=30)
        status, details = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        resp, status, details = None, e.code(), e.details() or ""
    method = call.method.rsplit("/", 1)[1] + (" bytes" if isinstance(call.request, bytes) else "")
    TALLY.codes[(method, status.name)] += 1
    return status, details, resp


def names_one(details: str, fields: set[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(f)}(?!\w)", details) for f in fields)


def bad_rank_fields(req: sieve_pb2.RankRequest, world: World) -> set[str]:
    cfg = world.rank_config
    bad = set()
    if req.user_id <= 0:
        bad.add("user_id")
    if not 0 <= req.k <= cfg.max_k:
        bad.add("k")
    ex = req.exclude_item_ids
    if len(ex) > cfg.max_exclude or (len(ex) and min(ex) <= 0):
        bad.add("exclude_item_ids")
    return bad


def check_rank(
    req: sieve_pb2.RankRequest,
    status: grpc.StatusCode,
    details: str,
    resp: sieve_pb2.RankResponse | None,
    world: World,
) -> None:
    bad = bad_rank_fields(req, world)
    assert status not in NEVER, (status, details)
    if bad:
        assert status == grpc.StatusCode.INVALID_ARGUMENT, (status, details, bad)
        assert names_one(details, bad), f"{details!r} names none of {bad}"
        return
    assert status == grpc.StatusCode.OK, (status, details)
    assert resp is not None
    k = req.k or world.rank_config.default_k
    ids = [i.item_id for i in resp.items]
    assert len(ids) <= k and len(set(ids)) == len(ids), ids
    assert not set(ids) & set(req.exclude_item_ids), "an excluded item came back"
    seen = world.seen.get(req.user_id)
    if seen is not None:
        assert not np.isin(ids, seen).any(), "a seen item came back"
    if len(ids) < k:
        assert resp.degradations, f"{len(ids)} < k={k} items and no degradation said why"
    for i in resp.items:
        assert all(map(math.isfinite, (i.final_score, i.candidate_score, i.model_score))), i
        assert 0.0 <= i.model_score <= 1.0, i
    if not req.debug:
        assert not resp.dropped and not any(i.moved_by for i in resp.items), "debug is off"


def bad_retrieve_fields(req: sieve_pb2.RetrieveRequest, world: World) -> set[str]:
    cfg = world.candidate_config
    bad = set()
    which = req.WhichOneof("query")
    if which is None:
        bad |= {"user_vector", "user_id"}
    elif which == "user_id" and req.user_id <= 0:
        bad.add("user_id")
    elif which == "user_vector":
        v = np.asarray(req.user_vector.values, np.float64)
        dim = world.text_dim if req.source == "text" else world.dim
        if len(v) != dim or not np.isfinite(v).all() or v @ v > np.finfo(np.float32).max:
            bad.add("user_vector")  # the last: its float32 inner products can overflow
    if req.source not in ("", "learned", "text"):
        bad.add("source")
    if not 1 <= req.k <= cfg.max_k:
        bad.add("k")
    ex = req.exclude_item_ids
    if len(ex) > cfg.max_exclude or (len(ex) and min(ex) <= 0):
        bad.add("exclude_item_ids")
    if set(req.allow_categories) - set(world.categories):
        bad.add("allow_categories")
    spaces = {req.source or "learned"}
    for i, m in enumerate(req.more):
        if m.source not in ("", "learned", "text"):
            bad.add(f"more[{i}].source")
        elif (m.source or "learned") in spaces:
            bad.add(f"more[{i}]")  # a space searched twice in one call
        spaces.add(m.source or "learned")
        if not 1 <= m.k <= cfg.max_k:
            bad.add(f"more[{i}].k")
        v = np.asarray(m.user_vector.values, np.float64)
        dim = world.text_dim if m.source == "text" else world.dim
        if len(v) != dim or not np.isfinite(v).all() or v @ v > np.finfo(np.float32).max:
            bad.add(f"more[{i}].user_vector")  # missing, empty or of another space
    return bad


def check_retrieve(
    req: sieve_pb2.RetrieveRequest,
    status: grpc.StatusCode,
    details: str,
    resp: sieve_pb2.RetrieveResponse | None,
    world: World,
) -> None:
    bad = bad_retrieve_fields(req, world)
    assert status not in NEVER, (status, details)
    unknown_user = req.WhichOneof("query") == "user_id" and req.user_id not in world.seen
    other_version = req.artifact_version not in ("", world.version)
    allowed = {grpc.StatusCode.OK} if not bad else {grpc.StatusCode.INVALID_ARGUMENT}
    if unknown_user:
        allowed.add(grpc.StatusCode.NOT_FOUND)
        allowed.discard(grpc.StatusCode.OK)
    if other_version:
        allowed.add(grpc.StatusCode.FAILED_PRECONDITION)
        allowed.discard(grpc.StatusCode.OK)
    assert status in allowed, (status, details, bad)
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        assert names_one(details, bad), f"{details!r} names none of {bad}"
    if status != grpc.StatusCode.OK:
        return
    assert resp is not None
    ids, scores = np.asarray(resp.item_ids, np.int64), np.asarray(resp.scores, np.float64)
    assert len(ids) == len(scores) <= req.k and len(set(ids.tolist())) == len(ids)
    assert np.isfinite(scores).all(), scores[~np.isfinite(scores)][:5]
    assert (np.diff(scores) <= 1e-5 * np.maximum(1.0, np.abs(scores[1:]))).all(), "not best first"
    assert not np.isin(ids, np.asarray(req.exclude_item_ids, np.int64)).any(), "excluded id"
    valid = ~np.isin(world.item_ids, np.asarray(req.exclude_item_ids, np.int64))
    if req.allow_categories:
        in_cats = np.logical_or.reduce([world.categories[c] for c in req.allow_categories])
        assert np.isin(ids, world.item_ids[in_cats]).all(), "an id outside allow_categories"
        valid &= in_cats
    assert len(ids) == min(req.k, int(valid.sum())), (len(ids), req.k, int(valid.sum()))
    assert resp.artifact_version == (req.artifact_version or world.version)
    assert [m.source for m in resp.more] == [m.source for m in req.more]
    for m, answer in zip(req.more, resp.more, strict=True):
        more_ids = np.asarray(answer.item_ids, np.int64)
        assert len(more_ids) == len(answer.scores) == min(m.k, int(valid.sum()))
        assert np.isin(more_ids, world.item_ids[valid]).all(), "excluded or outside the categories"
        assert np.isfinite(np.asarray(answer.scores)).all()


def check(call: Call, status: grpc.StatusCode, details: str, resp: Any, world: World) -> None:
    """The properties for one answered call (raw bytes: as the server decodes them)."""
    request = call.request
    if isinstance(request, bytes):
        kind = sieve_pb2.RankRequest if call.method == RANK else sieve_pb2.RetrieveRequest
        try:
            request = kind.FromString(request)
        except DecodeError:
            # sieve decodes requests itself (sieve/grpc_server.py add_servicer):
            # INVALID_ARGUMENT, naming the message type.
            assert status == grpc.StatusCode.INVALID_ARGUMENT, (status, details)
            assert "the request is not a valid sieve.v1." in details, details
            return
        resp_kind = sieve_pb2.RankResponse if call.method == RANK else sieve_pb2.RetrieveResponse
        resp = None if resp is None else resp_kind.FromString(resp)
    if call.method == RANK:
        check_rank(request, status, details, resp, world)
    else:
        check_retrieve(request, status, details, resp, world)


async def run_batch(channel: grpc.aio.Channel, calls: list[Call], world: World) -> None:
    answers = await asyncio.gather(*(send(channel, c) for c in calls))
    for call, (status, details, resp) in zip(calls, answers, strict=True):
        try:
            check(call, status, details, resp, world)
        except AssertionError as e:
            raise AssertionError(f"{call!r} -> {status.name} {details[:500]!r}: {e}") from e


# ----------------------------------------------------------------------- tests --


@settings(FUZZ, max_examples=examples("rank"))
@given(data=st.data())
async def test_fuzz_rank(
    channels: dict[str, grpc.aio.Channel], world: World, data: st.DataObject
) -> None:
    t0 = time.perf_counter()
    calls = data.draw(st.lists(rank_calls(world), min_size=BATCH // 2, max_size=BATCH))
    await run_batch(channels["ranker"], calls, world)
    TALLY.ran.add("rank")
    TALLY.seconds["rank"] = TALLY.seconds.get("rank", 0.0) + time.perf_counter() - t0


@settings(FUZZ, max_examples=examples("retrieve"))
@given(data=st.data())
async def test_fuzz_retrieve(
    channels: dict[str, grpc.aio.Channel], world: World, data: st.DataObject
) -> None:
    t0 = time.perf_counter()
    server = data.draw(st.sampled_from(["candidate", "batched"]), label="server")
    calls = data.draw(st.lists(retrieve_calls(world), min_size=BATCH // 2, max_size=BATCH))
    await run_batch(channels[server], calls, world)
    TALLY.ran.add("retrieve")
    TALLY.seconds["retrieve"] = TALLY.seconds.get("retrieve", 0.0) + time.perf_counter() - t0


@settings(FUZZ, max_examples=examples("garbage"))
@given(data=st.data())
async def test_fuzz_garbage_bytes(
    channels: dict[str, grpc.aio.Channel], world: World, data: st.DataObject
) -> None:
    t0 = time.perf_counter()
    calls = data.draw(st.lists(garbage_calls(world), min_size=BATCH // 2, max_size=BATCH))
    for method in (RANK, RETRIEVE):
        mine = [c for c in calls if c.method == method]
        channel = channels["ranker" if method == RANK else "candidate"]
        await run_batch(channel, mine, world)
    TALLY.ran.add("garbage")
    TALLY.seconds["garbage"] = TALLY.seconds.get("garbage", 0.0) + time.perf_counter() - t0


def _oversized(method: str, size: int) -> bytes:
    """A valid request of exactly ``size`` bytes: excluded ids of one byte each."""
    field_tag = b"\x1a" if method == RANK else b"\x22"  # exclude_item_ids, packed
    head = b"\x08\x01" if method == RANK else b"\x10\x01\x18\x05"  # user_id=1 (k=5)
    n = size - len(head) - 1
    for _ in range(3):  # the length prefix's own size depends on n
        prefix = _varint(n)
        n = size - len(head) - 1 - len(prefix)
    data = head + field_tag + _varint(n) + b"\x01" * n
    assert len(data) == size
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@settings(FUZZ, max_examples=6)
@given(
    method=st.sampled_from([RANK, RETRIEVE]),
    size=st.sampled_from([MAX_RECEIVE - 1, MAX_RECEIVE, MAX_RECEIVE + 1, 2 * MAX_RECEIVE]),
)
async def test_oversized_messages(
    channels: dict[str, grpc.aio.Channel], world: World, method: str, size: int
) -> None:
    """grpc refuses a message over the 8 MiB receive limit before sieve sees it; one
    at the limit reaches sieve, which names the field that is too long."""
    channel = channels["ranker" if method == RANK else "candidate"]
    status, details, _ = await send(channel, Call(method, _oversized(method, size), f"{size}"))
    if size > MAX_RECEIVE:
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED, (status, details)
        assert "larger than max" in details, details
    else:
        assert status == grpc.StatusCode.INVALID_ARGUMENT, (status, details)
        assert "exclude_item_ids holds" in details, details
    TALLY.ran.add("oversized")


async def test_servers_still_serve_after_fuzzing(
    channels: dict[str, grpc.aio.Channel], world: World
) -> None:
    """Runs last: normal requests still answer, and the fuzzing sent enough."""
    rank = Call(RANK, sieve_pb2.RankRequest(user_id=42), "user_id=42")
    status, details, resp = await send(channels["ranker"], rank)
    assert status == grpc.StatusCode.OK and len(resp.items) == 50, (status, details)
    for key in ("candidate", "batched"):
        req = sieve_pb2.RetrieveRequest(user_id=42, k=100)
        status, details, resp = await send(channels[key], Call(RETRIEVE, req, "user_id=42"))
        assert status == grpc.StatusCode.OK and len(resp.item_ids) == 100, (status, details)
    for key in ("ranker", "candidate", "batched"):
        health = health_pb2_grpc.HealthStub(channels[key])
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    histogram = "\n".join(f"  {m:<15} {c:<20} {n:>6}" for (m, c), n in sorted(TALLY.codes.items()))
    timing = ", ".join(f"{k} {s:.1f}s" for k, s in TALLY.seconds.items())
    print(f"\nfuzz: {TALLY.sent} requests sent ({timing})\n{histogram}")
    if {"rank", "retrieve", "garbage", "oversized"} <= TALLY.ran:
        assert TALLY.sent >= FUZZ_REQUESTS, f"sent {TALLY.sent}, want {FUZZ_REQUESTS}"
