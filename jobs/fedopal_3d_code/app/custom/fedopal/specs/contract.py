"""The wire contract: every field a FedOPAL site may send, in one place.

A site sends three kinds of message: the result of the `train` task (its update), the result of the `validate` task
(NVFlare's cross-site evaluation of the final global model) and experiment-tracking events (`fed.analytix_log_stats`,
one per tag and round). Each holds fields of FLARE's own protocol (headers, cookies, the sender's public context props:
names, ids, round numbers, never data) and fields FedOPAL puts there. `SITE_FIELDS` lists the latter, each with

- where it travels (`tensor`: a tensor group of the update; `meta`: DXO meta; `metric`: FLModel.metrics or a metrics
  result; `event_tag`: a tracking event's tag),
- the tasks that carry it,
- whether it is computed from the site's data, and
- its status under differential privacy (`dp`):
    noised       covered by the DP mechanism (the update's tensors, and what is computed from them alone, such as
                 their quantization state);
    setting      not computed from the site's data (DP settings and epsilon, schedule, random baselines): always
                 allowed;
    site allows  computed from the data and not noised: sent only where the policy names it (a site's privacy.json,
                 or the job's `privacy.allow_fields`), and then outside epsilon.

A policy (`WirePolicy`) adds what a site decides: the tensor groups that may leave, the data-derived fields it allows
by name (fnmatch patterns), and whether every tensor release must carry a DP record. The site's enforcer
(fedopal.policy.enforcer) applies it as the last step before anything leaves; the server's recorder
(fedopal.server.recorder) writes what arrived, and the tests hold one against the other. `docs/privacy.md`
"What leaves a site" is generated from a real run's record (fedopal.tools.docs).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from fedopal.specs.methods import GROUPS, group_of

TRAIN, VALIDATE, EVENT = "train", "validate", "event"
TRACKING_EVENT = "fed.analytix_log_stats"  # FLARE experiment tracking, fired by the site's SummaryWriter

# FedOPAL's own meta keys
DP_META_KEY = "fedopal_dp"  # what the site's DP mechanism did (settings and epsilon; policy.privacy)
WIRE_BYTES_KEY = "fedopal_wire_bytes"  # set on the server by its dequantizer (bytes received); never sent by a site
NUM_SAMPLES_KEY = "NUM_STEPS_CURRENT_ROUND"  # FLARE's FLMetaKey: the site's aggregation weight (its image count)

# -- FLARE's protocol: names only, no data ------------------------------------------------------------------------
FLARE_HEADERS = frozenset({
    "__audit_event_id__", "__content_type__", "__msg_root_id__", "__msg_root_ttl__", "__peer_ctx__", "__rc__",
    "__task_id__", "__task_name__", "__topic__", "current_round", "fl_client", "start_round", "num_rounds",
    "_validate_type", "__reply_is_late__",
    # federated events (FLARE's FedEventHeader)
    "_direction", "_event_id", "_event_type", "_origin", "_targets", "_timestamp",
})
FLARE_COOKIES = frozenset({"__task_id__", "__workflow__", "contribution_round", "_model_owner_"})
FLARE_PEER_PROPS = frozenset({"__client_name__", "__current_job_id__", "__fqsn__", "__identity_name__",
                              "__is_leaf__", "__run_num__"})
DXO_KINDS = {TRAIN: ("WEIGHT_DIFF",), VALIDATE: ("METRICS",), EVENT: ("ANALYTIC",)}
FLARE_EVENT_META = frozenset({"analytics_data_type", "tracker_key", "global_step", "kwargs", "kwargs.global_step"})


@dataclass(frozen=True)
class Field:
    name: str  # as on the wire; may be an fnmatch pattern ("personalized/*/auc", "quant_state.*")
    where: str  # tensor | meta | metric | event_tag
    tasks: tuple[str, ...]
    from_data: bool
    dp: str  # noised | setting | site allows
    what: str


_METRICS = "{personalized,global_only}/{val,test}/{balanced_accuracy,accuracy,auc}"
# segmentation (data.task): mean Dice and HD95 over the foreground classes, and each class's (dice/<class name>)
_SEG_METRICS = "{personalized,global_only}/{val,test}/{dice,hd95,dice/*,hd95/*}"
SITE_FIELDS: tuple[Field, ...] = (
    *(Field(g, "tensor", (TRAIN,), True, "noised",
            f"the update of tensor group {g} (its value after local training minus the value received)")
      for g in GROUPS),
    Field(NUM_SAMPLES_KEY, "meta", (TRAIN,), True, "site allows",
          "the site's number of training images (the aggregation weight with federation.aggregation_weights: "
          "samples)"),
    *(Field(f"{DP_META_KEY}.{k}", "meta", (TRAIN,), False, "setting", what) for k, what in (
        ("mode", "DP mode: update or dpsgd"), ("source", "who applied DP: job or site policy"),
        ("epsilon", "privacy loss so far, at delta"), ("delta", "delta"), ("noise_multiplier", "sigma"),
        ("clip_norm", "C"), ("releases", "rounds released so far (update mode)"),
        ("steps", "DP-SGD steps so far"), ("accountant", "prv or rdp"),
        ("unit", "what epsilon protects: the site's whole dataset (update), a patient or an image (dpsgd)"))),
    Field("filter_history", "meta", (TRAIN,), False, "setting", "names of the NVFlare filters that changed the update"),
    Field("PROCESSED_ALGORITHM", "meta", (TRAIN,), False, "setting",
          "NVFlare quantizer: the quantization mode; NVFlare HE: CKKS"),
    Field("PROCESSED_KEYS.*", "meta", (TRAIN,), False, "setting",
          "NVFlare HE (federation.encryption he): which tensors are encrypted (all of them)"),
    Field("quantized_flag", "meta", (TRAIN,), False, "setting", "NVFlare quantizer: the update is quantized"),
    Field("source_datatype.*", "meta", (TRAIN,), False, "setting", "NVFlare quantizer: each tensor's dtype"),
    Field("quant_state.*", "meta", (TRAIN,), True, "noised",
          "NVFlare quantizer: per-block scales of the released update (computed from it alone)"),
    Field(_METRICS, "metric", (TRAIN, VALIDATE), True, "site allows",
          "validation and test metrics of the personalized and global-only models"),
    Field(_METRICS, "event_tag", (EVENT,), True, "site allows", "the same metrics, as tracking events"),
    Field(_SEG_METRICS, "metric", (TRAIN, VALIDATE), True, "site allows",
          "segmentation: validation and test Dice and HD95 (mean and per class) of both models"),
    Field(_SEG_METRICS, "event_tag", (EVENT,), True, "site allows", "the same segmentation metrics, as tracking "
                                                                      "events"),
    Field("train/{task_loss,orth_loss}", "event_tag", (EVENT,), True, "site allows",
          "mean training losses of the round"),
    Field("train/lr_first", "event_tag", (EVENT,), False, "setting", "learning rate at the round's first step"),
    Field("diagnostics/{overlap_A,overlap_B}", "event_tag", (EVENT,), True, "site allows",
          "overlap of the global and personal adapters' subspaces (from the trained personal adapter)"),
    Field("diagnostics/overlap_u", "event_tag", (EVENT,), True, "site allows",
          "overlap of the two adapters' outputs on the validation images"),
    Field("diagnostics/{random_A,random_B,random_u}", "event_tag", (EVENT,), False, "setting",
          "what random subspaces of the same shapes give (from shapes alone)"),
    Field("privacy/{epsilon,epsilon_site_policy}", "event_tag", (EVENT,), False, "setting",
          "privacy loss so far"),
)


def expand(pattern: str) -> list[str]:
    """'a/{b,c}/d' -> ['a/b/d', 'a/c/d'] (brace alternatives, then fnmatch does the rest)."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.index("}", start)
    return [x for alt in pattern[start + 1:end].split(",")
            for x in expand(pattern[:start] + alt + pattern[end + 1:])]


def matches(pattern: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in expand(pattern))


def site_field(where: str, name: str, task: str) -> Field | None:
    """The contract's entry for a FedOPAL field, or None when the contract has none (then it may not leave)."""
    if where == "tensor":
        try:
            name = group_of(name)
        except KeyError:
            return None
    for f in SITE_FIELDS:
        if f.where == where and task in f.tasks and matches(f.name, name):
            return f
    return None


def is_protocol(where: str, name: str, task: str) -> bool:
    """A field of FLARE's own protocol (not data): allowed in every policy."""
    if where == "header":
        return name in FLARE_HEADERS
    if where == "cookie":
        return name in FLARE_COOKIES
    if where == "peer_prop":
        return name in FLARE_PEER_PROPS
    if where == "dxo_kind":
        return name.rsplit(".", 1)[-1] in DXO_KINDS.get(task, ())
    if where == "meta" and task == EVENT:
        return name in FLARE_EVENT_META
    return False


@dataclass(frozen=True)
class WirePolicy:
    """What one site lets out. allow_groups: tensor groups (methods.GROUPS); allow_fields: data-derived un-noised
    fields allowed by name (fnmatch patterns over wire names, e.g. "personalized/val/*"); require_dp: a tensor
    release without a DP record is withheld."""

    allow_groups: tuple[str, ...] = ("global.A", "global.B")
    allow_fields: tuple[str, ...] = ()
    require_dp: bool = False

    def __post_init__(self):
        unknown = [g for g in self.allow_groups if g not in GROUPS]
        if unknown or isinstance(self.allow_groups, str):
            raise ValueError(f"unknown tensor group(s) {unknown or self.allow_groups!r}; groups are "
                             f"{', '.join(GROUPS)}")
        if isinstance(self.allow_fields, str):
            raise ValueError(f"allow_fields must be a list of names, got the string {self.allow_fields!r}")

    def allows(self, where: str, name: str, task: str) -> bool:
        """May this field leave on this task?"""
        if is_protocol(where, name, task):
            return True
        field = site_field(where, name, task)
        if field is None:
            return False
        if field.where == "tensor":
            return group_of(name) in self.allow_groups
        if field.dp in ("setting", "noised"):
            return True
        return any(matches(p, name) for p in self.allow_fields)


def policy_for_job(shared_groups, privacy_enabled: bool, allow_fields=None) -> WirePolicy:
    """The job's own policy (in the simulator, the only one): the method's shared groups; without DP every field the
    site script sends, under DP only those named in `allow_fields` (config privacy.allow_fields)."""
    if allow_fields is None:
        allow_fields = () if privacy_enabled else tuple(f.name for f in SITE_FIELDS if f.dp == "site allows")
    return WirePolicy(allow_groups=tuple(shared_groups), allow_fields=tuple(allow_fields),
                      require_dp=privacy_enabled)
