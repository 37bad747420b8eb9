"""Sequences and campaigns: journeys that enroll customers, walk them through steps and send through one
dispatcher. **Steps create deliveries; one dispatcher sends them.**

Modules, by concern:

- ``definitions``: the YAML definitions of sequences and campaigns (pydantic models).
- ``sql``: the driver-level SQL of a tick's per-batch statements (SQLite and PostgreSQL).
- ``reports``: what a tick did (``TickReport``, ``StepCounts``, the column headers people read) and
  ``DeliveryHalted``.
- ``gate``: the delivery gate every message passes, whichever sequence or campaign sends it: consent and
  reachability (``profiles.consent``), quiet hours in the customer's timezone (``profiles.timezones``), the
  cross-channel frequency cap; and ``DeliveryPolicy``, the tick's rules built from the settings.
- ``deliveries``: the ``deliveries`` table: new rows, the claim, outcomes, moving an enrollment past a
  resolved delivery (``advance``) and sends a crash interrupted (``recover_interrupted``).
- ``enrollment``: entrants enrolled with one ``INSERT ... SELECT`` per sequence; the deterministic holdout.
- ``exits``: enrollments whose exit rule holds leave, their pending deliveries are dropped and their ad
  audiences emptied of them.
- ``walking``: due enrollments walked through ``wait``, ``branch`` and ``send`` steps, in batches.
- ``contexts``: what a template says about a customer, read from the store, and rendering for a batch.
- ``effects``: what providers told us about recipients (an SMS opt-out, a dead device token), applied.
- ``unsubscribe``: signed unsubscribe tokens.
- ``dispatch``: the ``Dispatcher``: due deliveries, a batch at a time, through the gate, rendering, the
  claim, the connectors and the recording of their results.
- ``tick``: one tick of every sequence (``run_tick``), stage by stage; ``sequence_status``.
- ``campaigns``: one-off campaigns, dispatched by the same dispatcher.

Nothing here keeps state between calls: the definitions a tick uses travel with its ``Dispatcher``, so
ticks with different definitions can run side by side in one process.
"""
