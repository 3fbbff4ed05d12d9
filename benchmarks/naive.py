"""The naive pipeline: Rank built from the same parts as a user would first write it.

    python -m benchmarks.naive --artifacts A --port 0 --ready-file F

A gRPC RankerService in one process, serving the same artifact set as sieve:
user and item features through Feast's own ``get_online_features`` (the set's
online store), exact search with a Faiss ``IndexFlatIP`` over all item embeddings
(ask for k + |seen|, drop the seen after) in the learned space with the stored
user vector, the DCN-v2 teacher in ONNX Runtime, one request at a time (no
batching, no in-process item table, no other candidate source, no user tower,
no re-rank rules), top 50 by score. It answers with the same stage timings as
sieve, so the latency benchmark can compare stage by stage.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import faiss
import grpc
import numpy as np

from features.definitions import ITEM_VIEW, user_view
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.features import assemble, item_inputs, source_inputs, user_inputs
from ranker.scorer import OnnxScorer
from ranker.sources import BIT
from sieve import artifacts
from sieve.ids import IdIndex

N_CANDIDATES = 1000


class NaiveRanker(sieve_pb2_grpc.RankerServiceServicer):
    def __init__(self, root: Path) -> None:
        from feast import FeatureStore

        aset = artifacts.load(root)
        self.version = aset.version
        self.store = FeatureStore(repo_path=str(aset.verified("feature_store").parent))
        emb = np.load(aset.verified("item_embeddings"))
        self.emb = emb
        self.text = np.load(aset.verified("text_embeddings"), mmap_mode="r")
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(np.ascontiguousarray(emb, np.float32))
        self.ids = aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64)
        self.rows = IdIndex(self.ids)
        m = aset.manifest.model
        self.scorer = OnnxScorer(
            str(aset.verified("teacher")), m.input_name, m.output_name, list(m.features), 1
        )
        self.scorer.load()
        view = user_view(aset.manifest.index.dim)
        self.user_refs = [f"{view.name}:{f.name}" for f in view.features]
        self.item_refs = [f"{ITEM_VIEW.name}:{f.name}" for f in ITEM_VIEW.features]

    async def RecordEvents(
        self, request: sieve_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RecordEventsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the naive pipeline takes no events")
        raise AssertionError("unreachable: abort raises")

    async def Rank(
        self, request: sieve_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RankResponse:
        marks: list[tuple[str, int]] = []
        start = last = time.perf_counter()

        def mark(stage: str) -> None:
            nonlocal last
            now = time.perf_counter()
            marks.append((stage, int((now - last) * 1e6)))
            last = now

        k = request.k or 50
        mark("validate")
        user = self.store.get_online_features(
            features=self.user_refs, entity_rows=[{"user_id": int(request.user_id)}]
        ).to_dict()
        mark("user_features")
        if user["user_vector"][0] is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no user {request.user_id}")
        vector = np.asarray(user["user_vector"][0], np.float32)[None]
        seen = np.asarray(user["seen_item_ids"][0] or [], np.int64)
        scores, rows = self.index.search(vector, N_CANDIDATES + len(seen))
        cand = self.ids[rows[0]]
        keep = ~np.isin(cand, seen)
        cand, rows = cand[keep][:N_CANDIDATES], rows[0][keep][:N_CANDIDATES]
        mark("retrieve")
        items = self.store.get_online_features(
            features=self.item_refs, entity_rows=[{"item_id": int(i)} for i in cand]
        ).to_dict()
        recent = np.asarray(user["recent_item_ids"][0] or [], np.int64)
        ann, extra = source_inputs(
            np.full(len(cand), BIT["learned"], np.uint8),
            np.zeros(len(cand), np.float32),
            self.emb[rows],
            vector[0],
            np.asarray(self.text[rows], np.float32),
            np.asarray(user["text_vector"][0], np.float32),
            self.emb[self.rows.rows(recent)[0][self.rows.rows(recent)[1]]],
        )
        x = assemble(
            ann,
            np.arange(len(cand)),
            user_inputs({name: user[name][0] for name in user}),
            item_inputs(items),
            extra,
        )
        mark("item_features")
        model = self.scorer.score(x)
        mark("score")
        top = np.argsort(-model, kind="stable")[:k]
        mark("rerank")
        total = int((time.perf_counter() - start) * 1e6)
        return sieve_pb2.RankResponse(
            items=[
                sieve_pb2.RankedItem(
                    item_id=int(cand[i]),
                    final_score=float(model[i]),
                    candidate_score=float(ann[i]),
                    model_score=float(model[i]),
                    candidate_rank=int(i),
                )
                for i in top
            ],
            timings=[sieve_pb2.StageTiming(stage=s, micros=us) for s, us in marks]
            + [sieve_pb2.StageTiming(stage="total", micros=total)],
            artifact_version=self.version,
        )


async def serve(root: Path, port: int, ready: Path | None) -> None:
    server = grpc.aio.server()
    sieve_pb2_grpc.add_RankerServiceServicer_to_server(NaiveRanker(root), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"naive ranker serving on 127.0.0.1:{bound}", flush=True)
    if ready is not None:
        ready.write_text(f"ranker {bound}\n")
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    ready = Path(args.ready_file) if args.ready_file else None
    asyncio.run(serve(Path(args.artifacts), args.port, ready))


if __name__ == "__main__":
    main()
