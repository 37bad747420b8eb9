"""The ``omni`` command line. Each command group lives in a module of its own (``omni/cli/<group>.py``
with a ``register(app)`` function) and calls the same engine functions the Prefect flows call, so no
command needs a Prefect server."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Annotated

import typer

from omni.cli.common import GuardedGroup, set_debug

# Command modules, in the order their commands are listed in `omni --help`.
COMMAND_MODULES = (
    "store",
    "audiences",
    "sequences",
    "campaigns",
    "templates",
    "outbox",
    "report",
    "serve",
    "keys",
    "suppressions",
    "demo",
)

app = typer.Typer(
    name="omni",
    help="Omni: omnichannel marketing automation. Profiles, audiences, sequences and channels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    cls=GuardedGroup,  # every command: one line on stderr and the contract's exit code, no traceback
)


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="OMNI_DEBUG",
            help="Show the full traceback of an error instead of a one-line message.",
        ),
    ] = False,
) -> None:
    set_debug(debug)  # read by the error guard (omni.cli.common.debug_enabled)


for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"omni.cli.{_name}") is not None:
        importlib.import_module(f"omni.cli.{_name}").register(app)


def main() -> None:
    app()
