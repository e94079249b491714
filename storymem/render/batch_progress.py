"""Progress of a batch render: one bar per rendering process (the shots it rendered of the stories it claimed)
and, on rank 0, the overall count of finished shots and stories, read from the story folders every few
seconds (so it counts the other processes' work too). Without bars (``--no-progress``) rank 0 logs the overall
count after each of its stories instead."""

from __future__ import annotations

import sys
import threading
from typing import Optional, Sequence

__all__ = ["BatchProgress", "overall_counts"]


def overall_counts(layout, stories: Sequence) -> dict:
    """Finished stories and rendered shots of the batch folder, as its story folders show them now."""
    from .batch import story_states

    states = story_states(layout, stories)
    valid = [s for s in states if s["status"] != "invalid"]
    return {"stories": len(valid), "finished": sum(s["status"] == "finished" for s in valid),
            "shots_done": sum(s["shots_done"] for s in valid), "shots_total": sum(s["num_shots"] for s in valid)}


class BatchProgress:
    """The bars of one process (see the module doc); ``enabled=False``: log lines only."""

    def __init__(self, world, layout, stories: Sequence, enabled: bool = True, interval_s: float = 5.0):
        from tqdm.auto import tqdm

        self.world, self.layout, self.stories = world, layout, list(stories)
        self.enabled = enabled
        self.main = world.rank == 0
        slot = 1 + world.local_rank // max(world.cp_degree, 1)  # rank 0's overall bar is line 0
        self.bar = tqdm(total=0, desc=f"rank {world.rank}", unit="shot", position=slot, file=sys.stderr,
                        disable=not (enabled and world.is_leader), dynamic_ncols=True)
        self.overall = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if enabled and self.main:
            counts = overall_counts(layout, self.stories)
            self.overall = tqdm(total=counts["shots_total"], initial=counts["shots_done"], desc="batch",
                                unit="shot", position=0, file=sys.stderr, dynamic_ncols=True)
            self._show(counts)
            self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)
            self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a folder read mid-change: the next poll reads it again
                pass

    def _show(self, counts: dict) -> None:
        self.overall.n = counts["shots_done"]
        self.overall.set_postfix_str(f"stories {counts['finished']}/{counts['stories']}", refresh=False)
        self.overall.refresh()

    def write(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    def story_started(self, story, start: int) -> None:
        self.bar.total += story.num_shots - start
        self.bar.set_description(f"rank {self.world.rank}: {story.name}", refresh=False)
        self.bar.refresh()

    def shot_done(self) -> None:
        self.bar.update(1)

    def refresh(self) -> None:
        """Count the batch's finished work again (rank 0)."""
        if not self.main:
            return
        counts = overall_counts(self.layout, self.stories)
        if self.overall is not None:
            self._show(counts)
        elif not self.enabled:
            self.write(f"batch: {counts['finished']} of {counts['stories']} stories finished, "
                       f"{counts['shots_done']} of {counts['shots_total']} shots")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.overall is not None:
            self._show(overall_counts(self.layout, self.stories))
            self.overall.close()
            self.overall = None
        self.bar.close()
