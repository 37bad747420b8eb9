"""The ``omni`` command line. Each command group lives in a module of its own (``omni/cli/<group>.py``
with a ``register(app)`` function) and calls the same engine functions the Prefect flows call, so no
command needs a Prefect server."""

from __future__ import annotations

import importlib
import importlib.util

import typer

# Command modules, in the order their commands are listed in `omni --help`.
COMMAND_MODULES = ("store", "audiences", "sequences", "campaigns", "templates", "outbox", "demo")

app = typer.Typer(
    name="omni",
    help="Omni: omnichannel marketing automation. Profiles, audiences, sequences and channels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"omni.cli.{_name}") is not None:
        importlib.import_module(f"omni.cli.{_name}").register(app)


def main() -> None:
    app()
