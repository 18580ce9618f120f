"""Result filters that decide which tensors may leave a site.

- SharedOnlyFilter(shared_pattern): keeps the keys a regex matches. The job adds it on every task with the method's
  shared keys (defense in depth behind the client, which already sends shared tensors only).
- TensorGroupFilter(allow): a site's own policy, by tensor group name (`global.A`, `global.B`, `personal.A`,
  `personal.B`, `head`, `backbone`; methods.GROUP_PATTERNS): everything outside the listed groups is dropped, and
  what was dropped is logged (by group and count).

Both also run as site-enforced filters from a site's local/privacy.json: `poc_setup/poc.py install-site-policy`
copies this file, methods.py and privacy.py into `<site kit>/local/custom/fedopal_site/`, so a site never depends on
(or is shadowed by) the `fedopal` package a job ships. Hence the relative import below. Patterns are stored as
strings (ExcludeVars' compiled regex does not survive job export).
"""

from __future__ import annotations

import re

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from .methods import GROUP_PATTERNS, GROUPS  # relative: this file also runs as fedopal_site.filters on a site


class SharedOnlyFilter(DXOFilter):
    def __init__(self, shared_pattern: str):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
                         data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
        self.shared_pattern = shared_pattern
        self._regex = re.compile(shared_pattern)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        weights = dxo.data
        removed = [k for k in weights if not self._regex.search(k)]
        if not removed:
            return None
        self.log_warning(fl_ctx, f"removed {len(removed)} non-shared tensor(s) from the result, e.g. {removed[0]}")
        dxo.data = {k: v for k, v in weights.items() if self._regex.search(k)}
        return dxo


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
