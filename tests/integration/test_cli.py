"""The ``sieve`` command line: every option explains itself, and ``sieve rank
--debug`` prints what the response's debug fields say, against real services."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from app.cli import format_debug, parser, rank_once
from sieve import artifacts


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_of_every_command_says_what_it_does() -> None:
    p = parser()
    missing = [
        f"sieve {name} {'/'.join(action.option_strings)}"
        for name, cmd in {"": p, **_subcommands(p)}.items()
        for action in cmd._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction)
        and action.help != argparse.SUPPRESS
        and not (action.help or "").strip()
    ]
    assert not missing, missing
    rank = _subcommands(p)["rank"].format_help()
    for option in ("--user", "--k", "--exclude", "--debug", "--address", "--artifacts"):
        assert option in rank


async def test_rank_debug_prints_sources_model_scores_rules_and_drops(
    servers: dict[str, object], artifacts_root: Path
) -> None:
    resp = await rank_once(str(servers["ranker"]), 42, 20, [], debug=True)
    assert len(resp.items) == 20 and not resp.rungs
    catalog = pd.read_parquet(artifacts.load(artifacts_root).path("catalog"))
    text = format_debug(resp, catalog).splitlines()
    titles = dict(zip(catalog["item_id"], catalog["title"], strict=True))
    rows = text[2 : 2 + len(resp.items)]
    for line, item in zip(rows, resp.items, strict=True):
        assert str(titles[item.item_id])[:40] in line
        assert f"{item.model_score:7.3f}" in line
        assert line.rstrip().endswith(", ".join(item.moved_by) if item.moved_by else "-")
    # the default chain's diversity rules move some of the 20 (MMR at lambda 0.5)
    assert any(item.moved_by for item in resp.items)
    assert text[2 + len(resp.items)] == f"dropped by the rules: {len(resp.dropped)}"
    assert text[-1] == "rungs: none (full quality)"
