"""What a FLARE message holds, field by field: the one description the site's enforcer and the server's recorder share.

A task result or a federated event is a Shareable (a dict): FLARE's headers (`__headers__`, with the sender's public
context props under `__peer_props__` and the `__cookie_jar__`), and a DXO: its kind, its data (tensors for a model,
named numbers for metrics, a tag and value for a tracking event) and its meta. `message_fields` names every leaf a
person would ask about ("which fields left the site?"), as (where, name) pairs, where is one of

    header, peer_prop, cookie, top_level, dxo_kind, tensor, metric, meta, event_tag

with nested meta dicts flattened to dotted names (`fedopal_dp.epsilon`), metrics (FLModel.metrics, which the Client
API puts in meta `initial_metrics` beside a model, or in the data of a METRICS DXO) named by their metric name, and a
tracking event by its tag. Values are not listed, except a tracking event's tag; `scalar_meta` returns the scalar
meta values (for the audit: "under DP, nothing un-noised derived from data").
"""

from __future__ import annotations

from typing import Any, Iterator

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

INITIAL_METRICS = "initial_metrics"  # nvflare MetaKey.INITIAL_METRICS: FLModel.metrics sent beside params
DXO_KEY = "DXO"
ANALYTIC_TAG_KEY = "track_key"  # nvflare AnalyticsData.to_dxo: the tag of a tracking event


def _flatten(prefix: str, value: Any) -> Iterator[str]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for v in value:  # a list of records (DP records): their keys, once
            yield from _flatten(prefix, v)
    else:
        yield prefix


def kind_name(kind) -> str:
    """A DXO kind as its plain name ("WEIGHT_DIFF"), whether FLARE gives the enum or its string."""
    return str(getattr(kind, "value", kind)).rsplit(".", 1)[-1]


def dxo_of(message: Shareable):
    """The message's DXO, or None when it carries none (a reply with only a return code)."""
    try:
        return from_shareable(message)
    except (ValueError, KeyError, TypeError):
        return None


def message_fields(message: Shareable) -> set[tuple[str, str]]:
    """Every field of a task result or federated event, as (where, name); see the module docstring."""
    fields: set[tuple[str, str]] = set()
    headers = message.get(ReservedHeaderKey.HEADERS) or {}
    for key in message:
        if key not in (ReservedHeaderKey.HEADERS, DXO_KEY):
            fields.add(("top_level", str(key)))
    for key, value in headers.items():
        if key == ReservedHeaderKey.PEER_PROPS and isinstance(value, dict):
            fields |= {("peer_prop", str(k)) for k in value}
        elif key == ReservedHeaderKey.COOKIE_JAR and isinstance(value, dict):
            fields |= {("cookie", str(k)) for k in value}
        else:
            fields.add(("header", str(key)))
    dxo = dxo_of(message)
    if dxo is None:
        return fields
    fields.add(("dxo_kind", kind_name(dxo.data_kind)))
    data = dxo.data if isinstance(dxo.data, dict) else {}
    if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        fields |= {("tensor", str(k)) for k in data}
    elif dxo.data_kind == DataKind.METRICS:
        fields |= {("metric", str(k)) for k in data}
    elif dxo.data_kind == DataKind.ANALYTIC:
        fields.add(("event_tag", str(data.get(ANALYTIC_TAG_KEY))))
    else:
        fields |= {("data", str(k)) for k in data}
    for key, value in (dxo.meta or {}).items():
        if key == INITIAL_METRICS and isinstance(value, dict):
            fields |= {("metric", str(k)) for k in value}
        else:
            fields |= {("meta", name) for name in _flatten(str(key), value)}
    return fields


def scalar_meta(message: Shareable) -> dict[str, Any]:
    """The DXO meta's scalar values (numbers, strings, booleans), flattened to dotted names; metrics excluded."""
    dxo = dxo_of(message)
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for v in value:
                walk(prefix, v)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[prefix] = value

    for key, value in ((dxo.meta or {}).items() if dxo else ()):
        if key != INITIAL_METRICS:
            walk(str(key), value)
    return out
