"""Every write of a job's status, stage, lease, progress or send time goes through here (the API,
the workers and the reconciler alike), checked against the state machine that
service/statemachine.py declares:

- a status moves only along `TRANSITIONS`, a stage only to one of its `next` stages; terminal
  states (succeeded, failed, cancelled) are final: `JobStateError` otherwise;
- a job is run by at most one worker at a time: a worker takes a *lease* (a random token written
  with a conditional UPDATE) and keeps it alive with heartbeats; a lease whose heartbeat is older
  than the timeout may be taken over (the reconciler re-sends such jobs). Writes by a worker are
  conditional on its token, so one that lost its lease cannot overwrite the new holder's state;
- every change a user should see is recorded as an event.

The functions take an open session and leave the commit to the caller's transaction. One package,
one writer: core.py (the status move, events, finish/settle), submit.py (the API's writes),
leases.py (a worker's), reconcile.py (the reconciler's); import them from `service.jobstate`.
"""

from service.jobstate.core import (
    DATA_COLUMNS,
    JobStateError,
    StaleMessage,
    add_event,
    finish,
    settle,
    settle_waiting,
)
from service.jobstate.leases import (
    Claim,
    acquire_lease,
    advance,
    hand_back,
    heartbeat,
    held,
    record,
    set_progress,
    start_stage,
)
from service.jobstate.reconcile import (
    RETRIES_EXHAUSTED,
    attempts_of_stage,
    cancel_unattended,
    count_resend,
    reclaim_dead,
    resend,
)
from service.jobstate.submit import (
    mark_sent,
    new_job,
    request_cancel,
)

__all__ = [
    "DATA_COLUMNS",
    "RETRIES_EXHAUSTED",
    "Claim",
    "JobStateError",
    "StaleMessage",
    "acquire_lease",
    "add_event",
    "advance",
    "attempts_of_stage",
    "cancel_unattended",
    "count_resend",
    "finish",
    "hand_back",
    "heartbeat",
    "held",
    "mark_sent",
    "new_job",
    "reclaim_dead",
    "record",
    "request_cancel",
    "resend",
    "set_progress",
    "settle",
    "settle_waiting",
    "start_stage",
]
