"""The ``omni`` command line. Each command group lives in a module of its own and calls the same
engine functions the Prefect flows call, so no command needs a Prefect server."""

from __future__ import annotations

import typer

from omni.cli import store

app = typer.Typer(
    name="omni",
    help="Omni: omnichannel marketing automation. Profiles, audiences, sequences and channels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store.register(app)


def main() -> None:
    app()
