"""The site's last word: the wire contract, enforced on the whole message as the last step before it leaves.

`WireContractEnforcer` is an NVFlare component. A hospital names it in its own `local/privacy.json` under
`components` (FLARE then adds it to every job that runs at the site, after the job's own components); a FedOPAL job
also carries one of its own (the job's policy, which is all the simulator has). It acts where NVFlare gives a site
the final say, after every filter (the site's scope filters run first, then the job's):

- `AFTER_TASK_RESULT_FILTER` (and again at `BEFORE_SEND_TASK_RESULT`, after FLARE adds its cookies): the task result
  is checked field by field against the contract (fedopal.specs.contract) and the site's `WirePolicy`: top-level keys,
  FLARE headers and cookies, the DXO's kind, every tensor (by group), every metric (FLModel.metrics and metrics
  results), every meta key (nested ones by dotted name). What is not allowed is removed in place, and one log line
  says what was removed. With `require_dp`, a train result whose tensors carry no DP record loses its tensors.
  A task the contract does not know (e.g. `submit_model`) leaves with no content.
- federated events (FLARE experiment tracking): an event whose tag the policy does not allow is held back at the
  site (FLARE's event runner sends outgoing events only; the enforcer marks it incoming). The first hold of each
  tag is logged; later ones are counted.
- every result: the sender's public context props (FLARE sends them with each message) must be FLARE's own; an
  unknown one withholds the result, since it cannot be removed from what FLARE attaches.

Limits, said plainly: a job that ships its own code (bring-your-own-code) runs that code in the site's process and
can reach the network without FLARE; only a site that turns `byoc` off and installs the pinned runtime has the last
word over everything (docs/deploy.md). What this component guarantees is that no FLARE filter, job component or
site script changes what leaves after it.
"""

from __future__ import annotations

from typing import Any

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import EventScope, FedEventHeader, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from fedopal.policy.wire import ANALYTIC_TAG_KEY, DXO_KEY, INITIAL_METRICS, dxo_of, kind_name
from fedopal.specs.contract import (
    DP_META_KEY, EVENT, FLARE_PEER_PROPS, TRACKING_EVENT, TRAIN, VALIDATE, WirePolicy)

KNOWN_TASKS = (TRAIN, VALIDATE)


class WireContractEnforcer(FLComponent):
    """Args (stored under the same names for FLARE's job export):
        allow_groups: tensor groups that may leave (specs.methods.GROUPS), e.g. ["global.A", "global.B"].
        allow_fields: data-derived, un-noised fields allowed by name or fnmatch pattern (specs.contract.SITE_FIELDS
            with dp "site allows"), e.g. ["personalized/val/*"]; default none.
        require_dp: withhold any tensor release that carries no DP record.
        source: who set this policy, for the log ("site policy" or "job").
    Raises ValueError at construction for an unknown group: a typo in privacy.json stops the job, it opens nothing."""

    def __init__(self, allow_groups: list[str] = ("global.A", "global.B"), allow_fields: list[str] = (),
                 require_dp: bool = False, source: str = "site policy"):
        super().__init__()
        for name, value in (("allow_groups", allow_groups), ("allow_fields", allow_fields)):
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of names, got {value!r}")
        if not isinstance(require_dp, bool):
            raise ValueError(f"require_dp must be true or false (JSON booleans), got {require_dp!r}")
        self.policy = WirePolicy(tuple(allow_groups), tuple(allow_fields), require_dp)
        self.allow_groups = list(allow_groups)
        self.allow_fields = list(allow_fields)
        self.require_dp = bool(require_dp)
        self.source = source
        self.dropped: dict[str, int] = {}  # "where:name" -> times removed (the audit's "fields dropped")
        self._held_tags: set[str] = set()
        self._last_result: Shareable | None = None

    # -- FLARE events ------------------------------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.AFTER_TASK_RESULT_FILTER:
            result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
            if isinstance(result, Shareable):
                self._last_result = result
                self.enforce(result, fl_ctx.get_prop(FLContextKey.TASK_NAME), fl_ctx)
        elif event_type == EventType.BEFORE_SEND_TASK_RESULT and self._last_result is not None:
            self.enforce(self._last_result, fl_ctx.get_prop(FLContextKey.TASK_NAME), fl_ctx)
            self._last_result = None
        elif event_type.startswith("fed.") and fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) == EventScope.FEDERATION:
            data = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
            if isinstance(data, Shareable) and data.get_header(FedEventHeader.DIRECTION, "out") == "out":
                self.enforce_event(event_type, data, fl_ctx)

    # -- task results ------------------------------------------------------------------------------------------
    def enforce(self, result: Shareable, task: str | None, fl_ctx: FLContext | None = None,
                quiet: bool = False) -> list[str]:
        """Remove, in place, every field of `result` the policy does not allow on `task`; returns what was removed
        as "where:name" strings (and logs them in one line unless quiet)."""
        removed: list[str] = []
        task = task or "unknown"
        unknown_props = self._unknown_public_props(fl_ctx)
        if task not in KNOWN_TASKS or unknown_props:
            if DXO_KEY in result:
                del result[DXO_KEY]
                removed.append(f"content:{task}")
            result.set_return_code(ReturnCode.EXECUTION_RESULT_ERROR)
            why = (f"the public context prop(s) {', '.join(unknown_props)} are not FLARE's" if unknown_props
                   else f"the contract has no task {task!r}")
            return self._report(removed, task, fl_ctx, quiet, why)
        for key in [k for k in result if k not in (ReservedHeaderKey.HEADERS, DXO_KEY)]:
            del result[key]
            removed.append(f"top_level:{key}")
        removed += self._headers(result, task)
        dxo = dxo_of(result)
        if dxo is not None:
            removed += self._dxo(dxo, task)
            dxo.update_shareable(result)
        return self._report(removed, task, fl_ctx, quiet)

    def _headers(self, result: Shareable, task: str) -> list[str]:
        removed = []
        headers = result.get(ReservedHeaderKey.HEADERS) or {}
        for key in list(headers):
            value = headers[key]
            if key in (ReservedHeaderKey.COOKIE_JAR, ReservedHeaderKey.PEER_PROPS) and isinstance(value, dict):
                where = "cookie" if key == ReservedHeaderKey.COOKIE_JAR else "peer_prop"
                for name in [n for n in value if not self.policy.allows(where, str(n), task)]:
                    del value[name]
                    removed.append(f"{where}:{name}")
            elif not self.policy.allows("header", str(key), task):
                del headers[key]
                removed.append(f"header:{key}")
        return removed

    def _dxo(self, dxo: DXO, task: str) -> list[str]:
        removed = []
        if not self.policy.allows("dxo_kind", kind_name(dxo.data_kind), task):
            removed += [f"dxo_kind:{kind_name(dxo.data_kind)}"] + [f"data:{k}" for k in dxo.data or {}]
            dxo.data_kind, dxo.data, dxo.meta = DataKind.METRICS, {}, {}
            return removed
        where = "tensor" if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) else "metric"
        for key in [k for k in dxo.data if not self.policy.allows(where, str(k), task)]:
            del dxo.data[key]
            removed.append(f"{where}:{key}")
        meta = dxo.meta or {}
        for key in list(meta):
            if key == INITIAL_METRICS and isinstance(meta[key], dict):
                for name in [n for n in meta[key] if not self.policy.allows("metric", str(n), task)]:
                    del meta[key][name]
                    removed.append(f"metric:{name}")
            else:
                kept, dropped = self._prune(str(key), meta[key], task)
                removed += [f"meta:{d}" for d in dropped]
                if kept is _DROP:
                    del meta[key]
                else:
                    meta[key] = kept
        if self.policy.require_dp and task == TRAIN and dxo.data and not meta.get(DP_META_KEY):
            removed += [f"tensor:{k} (no DP record)" for k in dxo.data]
            dxo.data = {}
        return removed

    def _prune(self, name: str, value: Any, task: str):
        """(what of value may leave, dropped dotted names); _DROP when nothing may."""
        if isinstance(value, dict) and value:
            kept, dropped = {}, []
            for k, v in value.items():
                sub, d = self._prune(f"{name}.{k}", v, task)
                dropped += d
                if sub is not _DROP:
                    kept[k] = sub
            return (kept if kept else _DROP), dropped
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            kept, dropped = [], []
            for v in value:  # a list of records (DP records): each pruned by its keys
                sub, d = self._prune(name, v, task)
                dropped += [x for x in d if x not in dropped]
                if sub is not _DROP:
                    kept.append(sub)
            return (kept if kept else _DROP), dropped
        return (value, []) if self.policy.allows("meta", name, task) else (_DROP, [name])

    def _unknown_public_props(self, fl_ctx: FLContext | None) -> list[str]:
        if fl_ctx is None:
            return []
        return sorted(k for k in fl_ctx.get_all_public_props() if k not in FLARE_PEER_PROPS)

    def _report(self, removed: list[str], task: str, fl_ctx, quiet: bool, why: str = "") -> list[str]:
        for r in removed:
            self.dropped[r] = self.dropped.get(r, 0) + 1
        if removed and fl_ctx is not None and not quiet:
            self.log_warning(fl_ctx, f"wire contract ({self.source}): removed from the {task} result "
                                     f"{'(' + why + ') ' if why else ''}{summarize_removed(removed)}")
        return removed

    # -- tracking events -----------------------------------------------------------------------------------------
    def enforce_event(self, event_type: str, data: Shareable, fl_ctx: FLContext | None = None) -> bool:
        """True if the event may leave; otherwise it is marked incoming (FLARE's runner then does not send it)."""
        dxo = dxo_of(data)
        tag = str((dxo.data or {}).get(ANALYTIC_TAG_KEY)) if dxo is not None and isinstance(dxo.data, dict) else ""
        allowed = (event_type == TRACKING_EVENT and dxo is not None
                   and self.policy.allows("dxo_kind", kind_name(dxo.data_kind), EVENT)
                   and self.policy.allows("event_tag", tag, EVENT))
        if allowed:
            return True
        data.set_header(FedEventHeader.DIRECTION, "in")
        key = f"event:{event_type}:{tag}"
        self.dropped[key] = self.dropped.get(key, 0) + 1
        if key not in self._held_tags and fl_ctx is not None:
            self._held_tags.add(key)
            self.log_warning(fl_ctx, f"wire contract ({self.source}): held back the {event_type} event {tag!r} "
                                     "(not in the policy); later ones of this tag are counted, not logged")
        return False


_DROP = object()


def summarize_removed(removed: list[str]) -> str:
    """One line for what was removed: tensors counted by group, other fields by kind with their first names."""
    from fedopal.specs.methods import group_of

    by_where: dict[str, list[str]] = {}
    for item in removed:
        where, _, name = item.partition(":")
        by_where.setdefault(where, []).append(name)
    parts = []
    for where, names in by_where.items():
        if where == "tensor":
            groups: dict[str, int] = {}
            for name in names:
                try:
                    group = group_of(name.split(" ")[0])
                except KeyError:
                    group = "unknown"
                groups[group] = groups.get(group, 0) + 1
            parts.append(f"{len(names)} tensor(s) (" + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())) + ")")
        else:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            parts.append(f"{len(names)} {where}(s) ({shown})")
    return "; ".join(parts)
