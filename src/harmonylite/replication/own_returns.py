"""How far this node's published changes have come back from each stream, so the change log
keeps every one still on its way.

The applier asks the change log about this node's own changes in flight: whether a newer
local change to a row follows the one coming back (then the older state is not written), whether
a row about to be displaced has its own change on the way (then the displacement is provisional),
how many removals of a row's content a table without a primary key still owes. A change pruned
from the log as soon as it was published, before it came back, was invisible to those questions:
an own change coming back late wrote an older state over the application's newer one, or
displaced for good a row the application had just given a UNIQUE value. So housekeeping prunes
only below the lowest change that may still be on its way.

The publisher notes, per stream, the highest change id it had acknowledged there; the applier
notes how far this node's own changes came back from it. A stream whose newest sent change is
back holds nothing on its way; on any other, everything above its mark may still be.
"""

from __future__ import annotations


class OwnReturns:
    """Per stream: the highest own change id sent there (this start) and come back from it."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = {}
        self._back: dict[str, int] = {}

    def sent(self, stream: str, upto: int) -> None:
        """JetStream acknowledged a message of this node's changes up to ``upto`` on
        ``stream``."""
        if upto > self._sent.get(stream, 0):
            self._sent[stream] = upto

    def came_back(self, stream: str, upto: int) -> None:
        """This node's own changes up to ``upto`` came back from ``stream`` (applied here)."""
        if upto > self._back.get(stream, 0):
            self._back[stream] = upto

    def back_everywhere(self, upto: int) -> None:
        """Every own change up to ``upto`` came back (past a shard-count change, on whichever
        old stream carried it)."""
        for stream in self._sent:
            self.came_back(stream, upto)

    def floor(self) -> int | None:
        """The lowest change id that may still be on its way back (None: none is)."""
        waiting = [self._back.get(s, 0) + 1 for s, top in self._sent.items()
                   if top > self._back.get(s, 0)]
        return min(waiting, default=None)
