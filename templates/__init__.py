"""Message templates and their rendering: the built-in ``.j2`` templates by channel (``email/``,
``sms/``, ``push/``, ``webhook/``) beside the sandboxed Jinja environment that renders them from a
context dict. No database here: ``sequences`` builds the contexts."""
