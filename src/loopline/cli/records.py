"""``loopline datasets`` and ``loopline audit``: what was ingested, and who did what."""

from __future__ import annotations

from typing import Annotated

import typer

from loopline.cli.common import ConfigOpt, JsonOpt, fail, open_store, when
from loopline.cli.output import cell, console, print_json
from loopline.errors import LooplineError


def datasets(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """List dataset versions (content hashes of ingested records)."""
    from rich.table import Table

    try:
        rows = open_store(config).datasets.all()
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    table = Table("version", "name", "records", "source", "created")
    for r in rows:
        table.add_row(
            r.version[:12], cell(r.name), str(r.n_records), cell(r.source_uri), when(r.created_at)
        )
    console.print(table)


def audit(
    config: ConfigOpt = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Show the audit log: who registered, aliased or resumed what, and when."""
    from rich.table import Table

    try:
        events = open_store(config).audit.recent(limit)
    except LooplineError as err:
        fail(err)
    if json_out:
        print_json([e.to_dict() for e in events])
        return
    table = Table("when", "actor", "action", "subject", "details")
    for e in events:
        table.add_row(
            when(e.at), cell(e.actor), cell(e.action), cell(e.subject), cell(e.details or "")
        )
    console.print(table)
