"""Result filter: only shared keys may leave a site.

Defense in depth behind the client (which already sends shared tensors only): used as the job's
client output filter on every task, and as a site-enforced filter in a site's privacy.json. The
pattern is stored as a string (ExcludeVars' compiled regex does not survive job export).
"""

from __future__ import annotations

import re

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


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
