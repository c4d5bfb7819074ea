"""DGL's asynchronous variant: a stage draws its input from a buffer of recent upstream outputs.

A stage fed by a slower one keeps working on the last ``capacity`` inputs it got,
least-reused first, each at most ``max_reuse`` times; fresh inputs replace the oldest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    item: Any
    uses: int = 0
    order: int = 0


class ReplayBuffer:
    def __init__(self, capacity: int, max_reuse: int) -> None:
        if capacity < 1 or max_reuse < 1:
            raise ValueError("replay buffer: capacity and max_reuse must be >= 1")
        self.capacity, self.max_reuse = capacity, max_reuse
        self._entries: list[_Entry] = []
        self._added = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, item: Any) -> None:
        if len(self._entries) == self.capacity:
            self._entries.pop(0)  # the oldest goes
        self._entries.append(_Entry(item, 0, self._added))
        self._added += 1

    def take(self) -> tuple[Any, int] | None:
        """The least-used entry (newest first among equals) and how often it was used before; None if all are used up."""
        usable = [e for e in self._entries if e.uses < self.max_reuse]
        if not usable:
            return None
        entry = min(usable, key=lambda e: (e.uses, -e.order))
        entry.uses += 1
        return entry.item, entry.uses - 1

    def clear(self) -> None:
        self._entries.clear()

    def state_dict(self) -> dict:
        """Entries and use counts, for checkpoints (items must be tensors or plain containers)."""
        return {"entries": [(e.item, e.uses, e.order) for e in self._entries], "added": self._added}

    def load_state_dict(self, state: dict) -> None:
        self._entries = [_Entry(item, uses, order) for item, uses, order in state["entries"]]
        self._added = state["added"]
