"""Message templates and their rendering: the built-in ``.j2`` templates by channel (``email/``,
``sms/``, ``push/``, ``webhook/``) beside the modules that render them from a context dict —
:mod:`templates.rendering` (finding templates, rendering and checking their parts), :mod:`templates.sandbox`
(the sandboxed Jinja environment and its render limits), :mod:`templates.filters` and
:mod:`templates.sms` (segment maths). No database here: :mod:`sequences.contexts` builds the contexts."""
