"""Methods as data: which adapters exist, which tensors train, which are shared, which regularizer applies.

Every trainable tensor of a model belongs to exactly one *group*, found from its key alone:

    global.A, global.B      the LoRA adapter named "global"
    personal.A, personal.B  the LoRA adapter named "personal"
    head                    the task head
    backbone                the foundation model's own weights (frozen unless a method trains them)

A method lists groups. The one trainer, the client, the result filter and the aggregator all read the
same spec, so adding a baseline is one entry in METHODS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

GROUPS = ("global.A", "global.B", "personal.A", "personal.B", "head", "backbone")

# Regexes over full model keys (see adapters.FedOpalModel). Stable: they depend only on peft's
# "lora_A.<adapter>" naming and on our own "head."/"backbone." prefixes.
GROUP_PATTERNS = {
    "global.A": r"^backbone\..*\.lora_A\.global\.",
    "global.B": r"^backbone\..*\.lora_B\.global\.",
    "personal.A": r"^backbone\..*\.lora_A\.personal\.",
    "personal.B": r"^backbone\..*\.lora_B\.personal\.",
    "head": r"^head\.",
    "backbone": r"^backbone\.(?!.*\.lora_)",
}
_COMPILED = {g: re.compile(p) for g, p in GROUP_PATTERNS.items()}

# FLARE's workflow needs a non-empty global model. A method that shares nothing (`local`) gets this one
# placeholder tensor on the server; sites ignore it and never send it back.
NOTHING_SHARED_KEY = "fedopal_nothing_shared"

# projection: no loss term; the personal adapter's A is kept in the orthogonal complement of A_g's row space
# (FedOpalModel.project_personal), so the overlap is zero by construction.
Regularizer = Literal["none", "weight", "representation", "projection"]
HeadMode = Literal["shared", "personal"]
# How the personal adapter is weighted at inference: always 1, or per instance by how much the input
# resembles this site's training data (FedDPA's instance-wise dynamic weighting).
InferenceWeighting = Literal["none", "instance_similarity"]


def group_of(key: str) -> str:
    """The group a model key belongs to; keys of peft's other bookkeeping fall in 'backbone'."""
    for group, pattern in _COMPILED.items():
        if pattern.search(key):
            return group
    raise KeyError(f"model key {key!r} belongs to no tensor group")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adapters: tuple[str, ...]  # peft adapter names, all active in the forward pass
    trainable: tuple[str, ...]  # groups that receive gradients
    shared: tuple[str, ...]  # groups sent to the server and averaged (head handled by `head`)
    regularizer: Regularizer = "none"
    head: HeadMode = "shared"  # where the method's own design puts the task head
    head_configurable: bool = False  # model.head may move it (dual methods: the "same head for all" table)
    inference_weighting: InferenceWeighting = "none"
    description: str = ""

    def resolve(self, head_mode: str | None = None) -> "MethodSpec":
        """Fix the head's place: the method's own design, or `head_mode` (config model.head) where the method allows
        it. Returns a spec whose `shared` lists 'head' iff the head is shared."""
        mode = head_mode if head_mode and self.head_configurable else self.head
        shared = tuple(g for g in self.shared if g != "head") + (("head",) if mode == "shared" else ())
        return replace(self, shared=shared, head=mode)

    @property
    def kept_on_site(self) -> tuple[str, ...]:
        """Trained groups that never leave the site."""
        return tuple(g for g in self.trainable if g not in self.shared)

    def is_shared(self, key: str) -> bool:
        return group_of(key) in self.shared

    def is_trainable(self, key: str) -> bool:
        return group_of(key) in self.trainable


_BOTH = ("global.A", "global.B", "personal.A", "personal.B", "head")

# Head placement by design: FedOPAL, FedDPA and dual_lora keep a personal head (the benchmark's head study), which
# model.head may move; the others fix it by definition (FedAvg-LoRA, FFA-LoRA, full_ft share it; local, FedSA-LoRA
# and late join keep it on site).
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("local", ("personal",), ("personal.A", "personal.B", "head"), (), head="personal",
                   description="each site alone: personal adapter + head, nothing sent"),
        MethodSpec("fedavg_lora", ("global",), ("global.A", "global.B", "head"), ("global.A", "global.B", "head"),
                   description="one LoRA adapter + head, all averaged"),
        MethodSpec("dual_lora", ("global", "personal"), _BOTH, ("global.A", "global.B", "head"), head="personal",
                   head_configurable=True, description="global + personal adapters, no orthogonality (FedDPA-style, lambda = 0)"),
        MethodSpec("fedopal_w", ("global", "personal"), _BOTH, ("global.A", "global.B", "head"), "weight",
                   head="personal", head_configurable=True,
                   description="FedOPAL: dual adapters + weight orthogonality"),
        MethodSpec("fedopal_r", ("global", "personal"), _BOTH, ("global.A", "global.B", "head"), "representation",
                   head="personal", head_configurable=True,
                   description="FedOPAL: dual adapters + representation orthogonality"),
        MethodSpec("fedopal_p", ("global", "personal"), _BOTH, ("global.A", "global.B", "head"), "projection",
                   head="personal", head_configurable=True,
                   description="FedOPAL: dual adapters, the personal adapter reads only the "
                                                "orthogonal complement of the global adapter's input subspace"),
        MethodSpec("ffa_lora", ("global",), ("global.B", "head"), ("global.B", "head"),
                   description="FFA-LoRA (Sun et al., ICLR 2024): A frozen at the common init, B + head averaged"),
        MethodSpec("fedsa_lora", ("global",), ("global.A", "global.B", "head"), ("global.A",), head="personal",
                   description="FedSA-LoRA (Guo et al., ICLR 2025): A averaged, B and head stay on site"),
        MethodSpec("feddpa", ("global", "personal"), _BOTH, ("global.A", "global.B", "head"), head="personal",
                   head_configurable=True, inference_weighting="instance_similarity",
                   description="FedDPA (Yang et al., NeurIPS 2024): dual adapters, instance-wise personal weight"),
        MethodSpec("full_ft", (), ("backbone", "head"), ("backbone", "head"),
                   description="full fine-tuning with FedAvg: backbone unfrozen, everything averaged"),
        # Not a federation method: a site that joins after training (fedopal.site.latejoin) loads the federation's
        # global adapter, keeps it frozen, and learns only what is its own. Orthogonality keeps the personal
        # adapter off the global adapter's input subspace, as in fedopal_w.
        MethodSpec("late_join", ("global", "personal"), ("personal.A", "personal.B", "head"), (), "weight",
                   head="personal",
                   description="late-joining site (fedopal latejoin): the federation's global adapter "
                               "frozen, personal adapter + head trained locally, nothing sent"),
    )
}


def get_method(name: str, head_mode: str | None = None) -> MethodSpec:
    """The spec of method `name`, its head placed by its own design, or by `head_mode` where it allows that."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name].resolve(head_mode)
