"""Hostile templates: each fails that render with a RenderError, quickly and with bounded memory, and never
raises out of render_many; good templates render exactly as before."""

from __future__ import annotations

import resource
import time

import pytest
from template_kit import NOW, SETTINGS, seed

from omni.core.settings import Settings
from profiles.db import session_scope
from sequences.contexts import render_many
from templates.rendering import RenderError, render_context

HOSTILE = {
    "huge range loop": "{% for i in range(10**9) %}x{% endfor %}",
    "huge range literal": "{% for i in range(1000000000) %}{% endfor %}",
    "giant power": "{{ 2**100000 }}",
    "power tower": "{{ 10 ** (10 ** 10) }}",
    "repeated power in a loop": "{% set ns = namespace(x=2) %}{% for i in range(40) %}"
    "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "string times": "{{ 'x' * 10**8 }}",
    "times string": "{{ 10**8 * 'x' }}",
    "list times": "{{ ([1] * 10**8) | length }}",
    "list of big strings": "{{ ['x' * 100000] * 100000 }}",
    "percent width": "{{ '%0100000000d' % 1 }}",
    "percent precision": "{{ '%.100000000f' % 1.5 }}",
    "percent star": "{{ '%*d' % (100000000, 1) }}",
    "format filter width": "{{ '%0100000000d' | format(1) }}",
    "str.format width": "{{ '{:>100000000}'.format(1) }}",
    "str.format nested width": "{{ '{:>{}}'.format(1, 100000000) }}",
    "format_map width": "{{ '{a:>100000000}'.format_map({'a': 1}) }}",
    "join of a huge range": "{{ range(10**8) | join(',') }}",
    "join repeated": "{{ (range(10000) | join(',')) * 1000 }}",
    "str join": "{{ ('x' * 500000).join(['a', 'b', 'c', 'd']) }}",
    "lipsum": "{{ lipsum(10**6) }}",
    "lipsum words": "{{ lipsum(5, max=10**7) }}",
    "nested loops": "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "nested loops with output": "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}"
    "{% endfor %}",
    "concat doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "plus doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "block set doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
    "{% set t %}{{ ns.s }}{{ ns.s }}"
    "{% endset %}{% set ns.s = t %}{% endfor %}{{ ns.s | length }}",
    "list doubling": "{% set l = [1] %}{% for i in range(40) %}{% set _ = l.extend(l) %}{% endfor %}"
    "{{ l | length }}",
    "list nesting": "{% set ns = namespace(l=['x' * 1000]) %}{% for i in range(40) %}"
    "{% set ns.l = [ns.l, ns.l] %}"
    "{% endfor %}{{ ns.l }}",
    "center": "{{ 'x' | center(10**8) }}",
    "str center": "{{ 'x'.center(10**8) }}",
    "ljust": "{{ 'x'.ljust(10**8) }}",
    "zfill": "{{ '1'.zfill(10**8) }}",
    "indent": "{{ ('x\n' * 100000) | indent(1000) }}",
    "replace": "{{ ('x' * 10000) | replace('x', 'y' * 10000) }}",
    "str replace": "{{ ('x' * 10000).replace('x', 'y' * 10000) }}",
    "expandtabs": "{{ ('\t' * 10000).expandtabs(10000) }}",
    "batch fill": "{{ [1] | batch(10**9, 'x') | list | length }}",
    "slice": "{{ [1] | slice(10**9) | list | length }}",
    "round": "{{ 5 | round(-10**9) }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}x{% endif %}"
    "{% endmacro %}{{ f(60) }}",
    "division by zero": "{{ 1 / 0 }}",
    "float overflow": "{{ 10.0 ** 400 }}",
    "long output": "{% for i in range(10000) %}{{ 'y' * 1000 }}{% endfor %}",
}


def _write(tmp_path, channel: str, name: str, part: str, source: str) -> Settings:
    (tmp_path / channel).mkdir(exist_ok=True)
    (tmp_path / channel / f"{name}.{part}.j2").write_text(source)
    return Settings(templates_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_template_fails_that_render_quickly(tmp_path, name):
    _write(tmp_path, "email", "evil", "txt", HOSTILE[name])
    (tmp_path / "email" / "evil.subject.j2").write_text("Hi")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The limit is on the rendering thread's CPU time (a busy machine must not fail good templates), so
    # that is what is measured: the hostile template is stopped after its budget, however loaded the box.
    started = time.thread_time()
    with pytest.raises(RenderError) as caught:
        render_context("email/evil", {"customer": {"id": 1}}, directory=tmp_path)
    elapsed = time.thread_time() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert elapsed < 2.0, f"{name}: {elapsed:.2f} s"
    assert grown_mb < 100, f"{name}: peak memory grew {grown_mb:.0f} MB"
    assert "cannot render email/evil for customer 1" in str(caught.value)


@pytest.mark.parametrize("channel,part", [("sms", "txt"), ("push", "body")])
def test_output_is_capped_lower_for_sms_and_push(tmp_path, channel, part):
    _write(tmp_path, channel, "long", part, "{% for i in range(1000) %}{{ 'y' * 100 }}{% endfor %}")
    if channel == "push":
        (tmp_path / "push" / "long.title.j2").write_text("Hi")
    with pytest.raises(RenderError, match="over a limit: the output is over the limit"):
        render_context(f"{channel}/long", {"customer": {"id": 1}}, directory=tmp_path)


GOOD = [
    "{% for i in range(3) %}{{ i }}{% endfor %} {{ range(5) | join(',') }} {{ 2 ** 10 }} {{ 'ab' * 3 }}",
    "{{ '%05.1f' % 3.14159 }} {{ '{:>6}'.format('x') }} {{ '%s-%s' | format('a', 'b') }}"
    " {{ 'x' | center(5) }}",
    "{{ 'a b' | replace(' ', '_') }} {{ [1, 2] + [3] }} {{ 'a' ~ 1 ~ none }}"
    " {{ [1, 2, 3, 4] | batch(2) | list }}",
    "{{ lipsum(1, html=false, min=5, max=6) | length > 0 }} {{ 3.14159 | round(2) }}"
    " {{ 'l1\nl2' | indent(2) }}",
    "{% set ns = namespace(n=0) %}{% for i in range(10) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}",
    "{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m('a') }}{{ m(2) }} {{ 'a,b'.split(',') | join('|') }}",
    "{% for i in [] %}x{% else %}empty{% endfor %}"
    " {% for a, b in {'k': 'v'}.items() %}{{ a }}={{ b }}{% endfor %}",
    "{% for i in range(3) %}{{ loop.index }}/{{ loop.length }}{% if not loop.last %},{% endif %}{% endfor %}",
]


@pytest.mark.parametrize("source", GOOD)
def test_good_templates_render_as_jinja_renders_them(tmp_path, source):
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from templates.sandbox import environment

    stock = SandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    ours = environment(tmp_path).from_string(source).render({})
    assert ours == stock.from_string(source).render({})
    _write(tmp_path, "sms", "good", "txt", source)
    assert render_context("sms/good", {"customer": {"id": 1}}, directory=tmp_path).text == ours.strip()


def test_render_many_never_raises_and_fails_every_customer_of_a_broken_template(engine, tmp_path):
    ana = seed(engine)
    bob = seed(engine, user_id="u-bob", phone="+14155550199", token=None)
    settings = _write(tmp_path, "sms", "broken", "txt", "{% for x in %}")
    _write(tmp_path, "sms", "slow", "txt", HOSTILE["nested loops"])
    _write(tmp_path, "sms", "overflow", "txt", HOSTILE["huge range loop"])
    with session_scope(engine) as session:
        for name in ("sms/broken", "sms/overflow", "sms/nope"):
            outcomes = render_many(session, name, [ana, bob, 999_999], now=NOW, settings=settings)
            assert set(outcomes) == {ana, bob, 999_999}
            assert all(isinstance(o, RenderError) for o in outcomes.values()), name
        assert "template error" in str(
            render_many(session, "sms/broken", [ana], now=NOW, settings=settings)[ana]
        )
        assert "no such template" in str(
            render_many(session, "sms/nope", [ana], now=NOW, settings=settings)[ana]
        )


def test_a_template_out_of_time_fails_the_rest_of_the_batch_at_once(engine, tmp_path):
    ids = [seed(engine, user_id=f"u-{n}", phone=f"+1415555{n:04d}", token=f"t-{n}") for n in range(6)]
    settings = _write(tmp_path, "sms", "slow", "txt", HOSTILE["nested loops"])
    started = time.thread_time()  # CPU time of this thread: see above
    with session_scope(engine) as session:
        outcomes = render_many(session, "sms/slow", ids, now=NOW, settings=settings)
    assert time.thread_time() - started < 4
    assert all(isinstance(o, RenderError) and o.kind == "time" for o in outcomes.values())
    assert "ran out of time for 3 customers" in outcomes[ids[-1]].reason


def test_a_customer_with_odd_data_fails_alone(engine):
    from sqlalchemy import update

    from profiles.models import Cart

    ana = seed(engine)
    bob = seed(engine, user_id="u-bob", phone="+14155550199", token=None)
    with session_scope(engine) as session:
        session.execute(
            update(Cart)
            .where(Cart.customer_id == bob)
            .values(items=[{"name": "Tee", "price": "not a number"}])
        )
    with session_scope(engine) as session:
        outcomes = render_many(session, "email/abandoned_cart", [ana, bob], now=NOW, settings=SETTINGS)
    assert outcomes[ana].subject
    assert isinstance(outcomes[bob], RenderError) and "context" in outcomes[bob].reason


def test_a_typo_still_fails(tmp_path):
    _write(tmp_path, "sms", "typo", "txt", "Hi {{ custmer.first_name }}")
    with pytest.raises(RenderError, match="'custmer' is undefined"):
        render_context("sms/typo", {"customer": {"id": 1}, "store": None}, directory=tmp_path)
    _write(tmp_path, "sms", "unguarded", "txt", "Come to {{ store.name }}")
    with pytest.raises(RenderError, match=r"if store"):
        render_context("sms/unguarded", {"customer": {"id": 1}, "store": None}, directory=tmp_path)
