"""Property-based fuzzing of ``load_config`` over generated TOML documents.

The documents follow the config models' own schema (walked at run time, so a new
key is fuzzed as soon as it exists) and then go wrong: unknown keys at any depth,
wrong types, numbers just outside their bounds, unknown rule names, random nesting,
text that is not TOML at all. ``load_config`` must return a ``SieveConfig`` or
raise ``pydantic.ValidationError`` (whose message names each offending key path,
and each path leads to a key the document holds) or ``tomllib.TOMLDecodeError``;
never anything else.
"""

from __future__ import annotations

import functools
import json
import math
import re
import tomllib
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.config import SieveConfig, load_config
from ranker.config import RerankConfig
from sieve.errors import ConfigError
from tests.fuzz.conftest import FUZZ

BARE = re.compile(r"^[A-Za-z0-9_-]+$")
OUTCOMES: Counter[str] = Counter()
ERRORS: Counter[str] = Counter()  # pydantic error types seen

# ------------------------------------------------------------ TOML, written out --


def toml_key(key: str) -> str:
    return key if BARE.match(key) else toml_string(key)


def toml_string(text: str) -> str:
    # JSON's escapes are TOML's; TOML also wants DEL escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    """Scalars first, then each table under its own ``[header]``."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"\n[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------- schema-led strategies --

keys = st.text(max_size=12) | st.sampled_from(["name", "type", "k", "rules", "Port", "port "])
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.booleans(),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def _bounds(metadata: list[Any]) -> list[float]:
    out = []
    for m in metadata:
        for attr in ("gt", "ge", "lt", "le"):
            bound = getattr(m, attr, None)
            if isinstance(bound, int | float) and isinstance(m, annotated_types.BaseMetadata):
                out.append(bound)
    return out


def numbers(kind: type, metadata: list[Any]) -> st.SearchStrategy[Any]:
    near = [b + d for b in _bounds(metadata) for d in (-1, 0, 1)]
    if kind is float:
        near += [b + d for b in _bounds(metadata) for d in (-1e-9, 1e-9)]
        base: st.SearchStrategy[Any] = st.floats(allow_nan=True, allow_infinity=True)
    else:
        near = [int(x) for x in near]
        base = st.integers(-(2**64), 2**64)
    return st.sampled_from(near) | base if near else base


def for_type(tp: Any, metadata: list[Any], depth: int) -> st.SearchStrategy[Any]:
    """Values for annotation ``tp``: mostly of its type, sometimes of any type."""
    return st.one_of(typed(tp, metadata, depth), typed(tp, metadata, depth), anything)


def typed(tp: Any, metadata: list[Any], depth: int) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return typed(args[0], [*metadata, *args[1:]], depth)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tables(tp, depth)
    if origin is Literal:
        return st.sampled_from(args) | st.text(max_size=8)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed(a, metadata, depth) for a in args))
    if origin in (tuple, list):
        return st.lists(for_type(args[0], [], depth), max_size=5 if depth < 4 else 1)
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return numbers(tp, metadata)
    if tp is str:
        return st.text(max_size=20)
    return anything


@functools.cache
def _field_values(model: type[BaseModel], depth: int) -> dict[str, st.SearchStrategy[Any]]:
    return {
        (f.alias or name): for_type(f.annotation, list(f.metadata), depth)
        for name, f in model.model_fields.items()
    }


_TAGS = ("name", "type")  # the discriminators of rules and online stores
_unknown = st.dictionaries(keys, anything, max_size=2)


def tables(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict for ``model``: a few of its keys (by alias), sometimes unknown keys; a
    rule or store table has its discriminator (``name``, ``type``) most of the time."""

    @st.composite
    def draw_table(draw: st.DrawFn) -> dict[str, Any]:
        values = _field_values(model, depth + 1)
        chosen = draw(st.lists(st.sampled_from(sorted(values)), max_size=4, unique=True))
        tags = [t for t in _TAGS if t in values and t not in chosen]
        if tags and draw(st.integers(0, 3)):
            chosen.append(tags[0])
        table = {key: draw(values[key]) for key in chosen}
        if draw(st.integers(0, 3)) == 0:
            table.update(draw(_unknown))
        return table

    return st.just({}) if depth > 5 else draw_table()


_rules = RerankConfig.model_fields["rules"]
rule_chains = st.builds(  # [ranker.rerank] rules, with unknown rule names among them
    lambda rules: {"ranker": {"rerank": {"rules": rules}}},
    typed(_rules.annotation, [], 2),
)
documents = st.one_of(
    rule_chains,
    tables(SieveConfig),
    tables(SieveConfig),
    tables(SieveConfig),
    st.dictionaries(keys, anything, max_size=4),
)
not_toml = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["[ranker\n", "a = 1\na = 2\n", "[x]\n[x]\n", "k = \n", "= 1", "a = [1,"]),
)


# ------------------------------------------------------------------- property --


def _leads_to_input(doc: Any, loc: tuple[int | str, ...]) -> bool:
    """Whether ``loc`` walks the document (discriminator tags in it are skipped)."""
    node = doc
    for part in loc:
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and 0 <= part < len(node)
        ):
            node = node[part]
        elif isinstance(node, dict) and part in (node.get("name"), node.get("type")):
            continue  # pydantic names the union member: rules.0.mmr.lambda
        else:
            return False
    return True


def check(path: Path, parsed: Any) -> None:
    try:
        config = load_config(path)
    except tomllib.TOMLDecodeError:
        OUTCOMES["TOMLDecodeError"] += 1
        assert parsed is None, "tomllib parsed it the first time"
        return
    except ConfigError as e:
        OUTCOMES["ConfigError"] += 1
        assert parsed is None and str(path) in str(e), str(e)
        return
    except pydantic.ValidationError as e:
        OUTCOMES["ValidationError"] += 1
        message = str(e)
        for err in e.errors():
            ERRORS[err["type"]] += 1
            # pydantic quotes a key holding a dot: build.`a.b`
            loc = ".".join(f"`{p}`" if "." in str(p) else str(p) for p in err["loc"])
            assert loc in message, f"{loc!r} not named in {message[:1000]}"
            if err["type"] != "missing":
                assert _leads_to_input(parsed, err["loc"]), f"{loc!r} is no key: {parsed!r}"
        return
    OUTCOMES["SieveConfig"] += 1
    assert isinstance(config, SieveConfig)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_config")


@settings(FUZZ, max_examples=300)
@given(doc=documents)
def test_fuzz_config_documents(folder: Path, doc: dict[str, Any]) -> None:
    path = folder / "sieve.toml"
    path.write_text(toml_document(doc), encoding="utf-8")
    parsed = tomllib.loads(path.read_text(encoding="utf-8"))
    check(path, parsed)


@settings(FUZZ, max_examples=150)
@given(text=not_toml)
def test_fuzz_config_text_that_may_not_be_toml(folder: Path, text: str) -> None:
    path = folder / "sieve.toml"
    path.write_text(text, encoding="utf-8")
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        parsed = None
    check(path, parsed)


@settings(FUZZ, max_examples=50)
@given(data=st.binary(max_size=40))
def test_fuzz_config_bytes(folder: Path, data: bytes) -> None:
    path = folder / "sieve.toml"
    path.write_bytes(data)
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        parsed = None
    check(path, parsed)


def test_deeply_nested_config(folder: Path) -> None:
    path = folder / "sieve.toml"
    path.write_text("[ranker]\nport = " + "[" * 2000 + "]" * 2000 + "\n", encoding="utf-8")
    check(path, None)


def test_outcomes_are_varied() -> None:
    """Runs last: the documents reached every outcome (else the fuzzing is weak)."""
    print(f"\nconfig fuzz outcomes: {dict(OUTCOMES)}\nerror types: {dict(ERRORS.most_common())}")
    assert OUTCOMES["ValidationError"] and OUTCOMES["SieveConfig"] and OUTCOMES["TOMLDecodeError"]
    for kind in ("extra_forbidden", "union_tag_invalid", "greater_than_equal", "int_type"):
        assert ERRORS[kind], f"no {kind} error: the documents miss a kind of mistake"
