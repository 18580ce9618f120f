"""The server workflow: FLARE's FedAvg, with one change for hospitals.

Every available site trains in every round, and a round closes once `min_responses` sites have answered and
the others have had `straggler_wait` more seconds. A site that dies mid-round therefore does not stall the
federation: the round completes with the others, and the site rejoins a later (or resumed) job with its
personal state intact on its own disk. With min_responses equal to the number of sites this is plain FedAvg.
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg


class FedOpalFedAvg(FedAvg):
    def __init__(self, *args, min_responses: int = 0, straggler_wait: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_responses = min_responses  # 0: every site that received the task must answer
        self.straggler_wait = straggler_wait

    def sample_clients(self, num_clients: int = None) -> list[str]:
        return super().sample_clients(None)  # every available site, not a random subset of min_clients

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        self.broadcast_model(data=data, task_name=task_name, targets=targets,
                             min_responses=min_responses or self.min_responses, timeout=timeout,
                             wait_time_after_min_received=self.straggler_wait, blocking=False, callback=callback)
