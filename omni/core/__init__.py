"""Omni's core: the facts and plumbing every layer shares, importing nothing else of Omni.

- :mod:`omni.core.settings`: the typed ``Settings``, read from the environment only at the top (the
  CLI and the flows) and handed down.
- :mod:`omni.core.channels`: the one channel model (each channel's facts) and the touchpoints.
- :mod:`omni.core.statuses`: delivery, enrollment and consent statuses.
- :mod:`omni.core.clock`: ``utcnow``, the one clock callers inject ``now`` instead of.
- :mod:`omni.core.definitions`: YAML loading, ``DefinitionError`` (file, path, reason), durations.
- :mod:`omni.core.batching`: ``chunked``; :mod:`omni.core.collector`: the garbage collector around bulk work.
"""
