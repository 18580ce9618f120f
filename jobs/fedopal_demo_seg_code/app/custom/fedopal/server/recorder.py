"""The wire audit: everything each site sent this job, as the server received it, one JSON line per message.

`WireRecorder` is a server component of every FedOPAL job. It records
- every task result (train, cross-site evaluation, anything else), before the server's own filters run (so quantized
  updates are recorded as they crossed the network): sender, task, round, and its fields (policy.wire.message_fields:
  FLARE headers and the sender's public context props, DXO kind, tensor keys, metric names, meta keys) plus the
  scalar meta values;
- every federated event a site fired (FLARE experiment tracking: `fed.analytix_log_stats`), with its tag.

to `<app_server>/fedopal_wire.jsonl`. Nothing is filtered or changed: the recorder only looks. The tests hold each
line against the wire contract (fedopal.specs.contract), and `docs/privacy.md` "What leaves a site" is generated from
a real run's file.
"""

from __future__ import annotations

import json
import os
import threading

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import EventScope, FedEventHeader, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedopal.policy.wire import message_fields, scalar_meta

WIRE_LOG = "fedopal_wire.jsonl"
FED_EVENT_PREFIX = "fed."


def _from_one(current_round):
    """FLARE's current_round (from 0) as the round a person reads (from 1); None when the message has none."""
    return current_round + 1 if isinstance(current_round, int) else None


class WireRecorder(FLComponent):
    """Server-side: record every result and federated event a site sends (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.BEFORE_TASK_RESULT_FILTER:
            result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
            if isinstance(result, Shareable):
                peer = fl_ctx.get_peer_context()
                self._write(fl_ctx, {"kind": "task_result", "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                                     "site": peer.get_identity_name() if peer else None,
                                     "round": _from_one(result.get_header("current_round"))}, result)
        elif event_type.startswith(FED_EVENT_PREFIX):
            if fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) != EventScope.FEDERATION:
                return
            data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
            if isinstance(data, Shareable):
                self._write(fl_ctx, {"kind": "event", "event": event_type,
                                     "site": data.get_header(FedEventHeader.ORIGIN)}, data)

    def _write(self, fl_ctx: FLContext, entry: dict, message: Shareable) -> None:
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        if not app_root:
            return
        entry["fields"] = sorted([list(f) for f in message_fields(message)])
        entry["meta_values"] = scalar_meta(message)
        with self._lock, open(os.path.join(app_root, WIRE_LOG), "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def read_wire_log(path: str) -> list[dict]:
    """The recorder's lines, parsed ([] where there is no file)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
