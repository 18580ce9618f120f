"""A site's allow-list by tensor group, as an NVFlare result filter (a site's local/privacy.json scope filter).

TensorGroupFilter(allow): only tensors of the listed groups (`global.A`, `global.B`, `personal.A`, `personal.B`,
`head`, `backbone`; specs.methods.GROUP_PATTERNS) leave; everything else is dropped, and what was dropped is logged
(by group and count). It runs first, among the site's scope filters; the site's WireContractEnforcer
(policy.enforcer) applies the same groups again after every filter, the job's included.
"""

from __future__ import annotations

import re

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedopal.specs.methods import GROUP_PATTERNS, GROUPS


class TensorGroupFilter(DXOFilter):
    """A site's allow-list: only tensors of the named groups leave; everything else is dropped and logged.

    allow: group names, e.g. ["global.A", "global.B"] (a key of no known group is dropped too). Raises ValueError
    for an unknown group name, at construction: a site's privacy.json with a typo stops the job, it does not open
    anything."""

    def __init__(self, allow: list[str]):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
                         data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
        unknown = [g for g in allow if g not in GROUP_PATTERNS]
        if unknown or isinstance(allow, str):
            raise ValueError(f"TensorGroupFilter: unknown tensor group(s) {unknown or allow!r} in 'allow'; groups are "
                             f"{', '.join(GROUPS)}. Fix the list in the site's local/privacy.json.")
        self.allow = list(allow)
        self._patterns = {g: re.compile(GROUP_PATTERNS[g]) for g in GROUPS}

    def group_of(self, key: str) -> str | None:
        for group, pattern in self._patterns.items():
            if pattern.search(key):
                return group
        return None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        dropped: dict[str, int] = {}
        kept = {}
        for key, value in dxo.data.items():
            group = self.group_of(key)
            if group in self.allow:
                kept[key] = value
            else:
                dropped[group or "unknown"] = dropped.get(group or "unknown", 0) + 1
        if not dropped:
            return None
        what = ", ".join(f"{n} {g}" for g, n in sorted(dropped.items()))
        self.log_warning(fl_ctx, f"site policy (allow {', '.join(self.allow)}): dropped {sum(dropped.values())} "
                                 f"tensor(s) from the result: {what}")
        dxo.data = kept
        return dxo
