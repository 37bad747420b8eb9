"""Audiences: declarative definitions (``audiences/*.yaml``) compiled to one set-based SQL statement each,
and memberships with their entered / exited history.

    from audiences import load_audiences, build_audiences, compile_condition

    definitions = load_audiences()                       # validated; DefinitionError names file and path
    results = build_audiences(engine, now=now)           # every audience, dependencies first
    ids = compile_condition({"reachable": "sms"}, now=now, definitions=definitions)  # a Select
"""

from audiences.build import (
    BuildResult,
    UnknownAudience,
    build_audience,
    build_audiences,
    build_order,
    last_builds,
    members,
)
from audiences.compiler import compile_audience, compile_condition, render_sql
from audiences.definitions import (
    AudienceDefinition,
    Condition,
    DefinitionError,
    load_audiences,
    parse_condition,
    parse_duration,
)

__all__ = [
    "AudienceDefinition",
    "BuildResult",
    "Condition",
    "DefinitionError",
    "UnknownAudience",
    "build_audience",
    "build_audiences",
    "build_order",
    "compile_audience",
    "compile_condition",
    "last_builds",
    "load_audiences",
    "members",
    "parse_condition",
    "parse_duration",
    "render_sql",
]
