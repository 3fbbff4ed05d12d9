"""Decoding Feast's serialized values, and Feast's Redis field hashing."""

from __future__ import annotations

import numpy as np
import pytest
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value

from features.definitions import FeatureSpec
from features.reader import decode_column, feature_field
from sieve.errors import ArtifactError


def test_feature_field_matches_feast() -> None:
    for view, feat in [("item_features", "genres"), ("user_features", "rating_mean")]:
        assert feature_field(view, feat) == _mmh3(f"{view}:{feat}")


def test_decode_scalars_lists_and_missing() -> None:
    f = [Value(float_val=1.5).SerializeToString(), None, Value().SerializeToString()]
    # missing floats are unknown, not zero: the scorer's default applies to them
    np.testing.assert_array_equal(
        decode_column(f, FeatureSpec("x", "float")), [1.5, np.nan, np.nan]
    )
    i = [Value(int64_val=2**40).SerializeToString(), None]
    out = decode_column(i, FeatureSpec("x", "int64"))
    assert out.dtype == np.int64 and out.tolist() == [2**40, 0]
    fl = [Value(float_list_val=FloatList(val=[0.5, 0.25])).SerializeToString(), None]
    np.testing.assert_array_equal(
        decode_column(fl, FeatureSpec("x", "float_list", 2)), [[0.5, 0.25], [np.nan, np.nan]]
    )
    il = [Value(int64_list_val=Int64List(val=[3, 1])).SerializeToString(), None]
    got = decode_column(il, FeatureSpec("x", "int64_list"))
    assert [a.tolist() for a in got] == [[3, 1], []]


def test_wrong_list_length_is_an_artifact_error() -> None:
    fl = [Value(float_list_val=FloatList(val=[0.5])).SerializeToString()]
    with pytest.raises(ArtifactError, match="has 1 values, schema says 2"):
        decode_column(fl, FeatureSpec("emb", "float_list", 2))


def test_entity_keys_match_feast_serialization() -> None:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey

    from features.reader import EntityKeys

    ids = np.array([1, 2, 610, 193609, -7, 2**40 + 1, 2**63 - 1, -(2**63)], dtype=np.int64)
    ids = np.concatenate([ids, np.random.default_rng(0).integers(-(2**62), 2**62, 500)])
    got = EntityKeys("item_id", 3)(ids)
    want = [
        serialize_entity_key(
            EntityKey(join_keys=["item_id"], entity_values=[Value(int64_val=int(i))]),
            entity_key_serialization_version=3,
        )
        for i in ids
    ]
    assert got == want


def test_float_list_fast_path_equals_protobuf() -> None:
    rng = np.random.default_rng(0)
    vals = rng.normal(size=(50, 384)).astype(np.float32)
    vals[3] = [np.float32(-0.0)] * 384
    raw = [Value(float_list_val=FloatList(val=v.tolist())).SerializeToString() for v in vals]
    got = decode_column(raw, FeatureSpec("emb", "float_list", 384))
    slow = np.array([list(Value.FromString(b).float_list_val.val) for b in raw], np.float32)
    np.testing.assert_array_equal(got, slow)
    np.testing.assert_array_equal(got, vals)
