"""Shared fixtures: real MovieLens, one real build, a real Redis, real servers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio  # noqa: E402
import inspect  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402

from app.build import BuildReport, build  # noqa: E402
from app.config import BuildConfig  # noqa: E402
from candidate.config import CandidateConfig  # noqa: E402
from ranker.config import RankerConfig, ReliabilityConfig, RerankConfig, StageBudgetMs  # noqa: E402
from ranker.rerank import GroupCap, Mmr, Seen  # noqa: E402
from sieve import artifacts  # noqa: E402
from sieve.local_redis import local_redis  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def sieve_process(*args: str, **kw: object) -> subprocess.Popen[str]:
    """``python -m app.cli ARGS`` from the checkout, output (both streams) to a pipe."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


MOVIELENS = Path(
    os.environ.get("SIEVE_MOVIELENS", ROOT.parent / "shared/data/movielens/ml-latest-small")
)
# The default rule chain without its fatigue rule: Rank answers the same to the
# same request, so tests can compare servers. Fatigue has tests of its own.
STATELESS = RerankConfig(rules=(Seen(), Mmr(lambda_=0.5), GroupCap(cap=5)))
# A minute of headroom: tests that compare answers must get full-quality ones on a
# loaded CI machine, not the degradation ladder's rungs (which have tests of their
# own, tests/integration/test_degradation.py, with the production budgets).
RELAXED = ReliabilityConfig(budget_ms=StageBudgetMs(headroom=60_000.0))
# Embeddings survive between local runs here; CI starts from a clean clone.
EMBED_CACHE = Path(os.environ.get("SIEVE_TEST_CACHE", ROOT / ".pytest_cache" / "sieve"))


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS / "ratings.csv").is_file():
        raise FileNotFoundError(
            f"MovieLens ml-latest-small not found at {MOVIELENS}; set SIEVE_MOVIELENS"
        )
    return MOVIELENS


@pytest.fixture(scope="session")
def built(movielens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """One full offline build on real MovieLens, shared by the whole session."""
    out = tmp_path_factory.mktemp("artifacts")
    return build(movielens_dir, out, BuildConfig(), EMBED_CACHE)


@pytest.fixture(scope="session")
def artifacts_root(built: BuildReport) -> Path:
    return built.root.parent.parent


@pytest.fixture(scope="session")
def artifact_set(artifacts_root: Path) -> artifacts.ArtifactSet:
    return artifacts.load(artifacts_root)


async def until(check: Callable[[], bool | Awaitable[bool]], within_s: float, what: str) -> float:
    """Poll ``check`` (sync or async) until it is true; seconds it took. Fails
    after ``within_s``."""
    t0 = time.monotonic()
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return time.monotonic() - t0
        if time.monotonic() - t0 > within_s:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.02)


def copy_artifacts(artifacts_root: Path, dest: Path) -> Path:
    """A private copy of the live artifact set, for tests that damage or change it."""
    folder = artifacts.resolve(artifacts_root)
    target = dest / "versions" / folder.name
    shutil.copytree(folder, target)
    artifacts.publish(dest, folder.name)
    return dest


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work folder for the process-level harnesses (latency budget, faults), so
    their 20k-item synthetic set on Redis is built once per session."""
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence, stopped after."""
    with local_redis() as address:
        yield address


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def servers(artifacts_root: Path) -> AsyncIterator[dict[str, object]]:
    """Candidate and ranker servers on free loopback ports, in this process."""
    from candidate.service import create_server as create_candidate
    from ranker.service import create_server as create_ranker

    cserver, cservicer = await create_candidate(CandidateConfig(port=0), artifacts_root)
    rconfig = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{cserver.port}",
        item_refresh_s=0,
        rerank=STATELESS,
        reliability=RELAXED,
    )
    rserver, pipeline = await create_ranker(rconfig, artifacts_root)
    yield {
        "candidate": f"127.0.0.1:{cserver.port}",
        "ranker": f"127.0.0.1:{rserver.port}",
        "candidate_servicer": cservicer,
        "pipeline": pipeline,
        "ranker_config": rconfig,
    }
    await rserver.stop(0)
    await cserver.stop(0)
