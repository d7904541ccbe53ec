"""Device slots: which adapter revision sits in which numbered slot of the LoRA modules, with LRU
eviction of slots that no running request uses.

Only the scheduler thread calls this (it owns the model), so there is no lock. Slot 0 is the base
model and is never assigned. Knows nothing about stores; a slot is always a copy of a host adapter,
so evicting a slot never drops an adapter's only copy.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from serve.engine.adapters import HostAdapter
from serve.engine.lora import LoraBatchState, LoraLinear

logger = logging.getLogger(__name__)


class SlotTable:
    def __init__(self, modules: dict[str, LoraLinear], num_slots: int, lora_state: LoraBatchState):
        self.modules, self.lora_state = modules, lora_state
        self.num_slots = num_slots                     # usable slots, numbered 1..num_slots
        self._slots: OrderedDict[str, int] = OrderedDict()   # key -> slot, LRU order
        self._ranks: dict[int, int] = {}               # slot -> adapter rank
        self._users: dict[int, int] = {}               # slot -> running requests using it
        self._free = list(range(num_slots, 0, -1))
        self.hits = self.misses = self.evictions = 0

    def acquire(self, adapter: HostAdapter) -> int | None:
        """Slot holding `adapter` (writing it if needed) with one more user; None if every slot is busy."""
        key = adapter.key
        slot = self._slots.get(key)
        if slot is not None:
            self.hits += 1
            self._slots.move_to_end(key)
        else:
            slot = self._free.pop() if self._free else self._evict_lru()
            if slot is None:
                return None
            self.misses += 1
            self._write(slot, adapter)
            self._slots[key] = slot
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if slot > 0:
            self._users[slot] -= 1

    def rank_of(self, slot: int) -> int:
        return self._ranks.get(slot, 0)

    def _evict_lru(self) -> int | None:
        for key, slot in self._slots.items():
            if self._users.get(slot, 0) == 0:
                self.evict(key)
                return self._free.pop()
        return None

    def evict(self, key: str) -> None:
        """The one eviction hook of the device tier: forget the key and free its slot."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return
        if self._users.get(slot, 0):
            self._slots[key] = slot     # in use by a running request: it goes when released
            return
        self.evictions += 1
        self._ranks.pop(slot, None)
        self._free.append(slot)
        logger.debug("slot %d freed (%s)", slot, key)

    def evict_name(self, name: str) -> None:
        for key in [k for k in self._slots if k.partition("@")[0] == name]:
            self.evict(key)

    def _write(self, slot: int, adapter: HostAdapter) -> None:
        """Copy the adapter into `slot` of every module (modules it lacks get zeros)."""
        for module in self.modules.values():
            module.grow_rank(adapter.rank)
        for path, module in self.modules.items():
            pair = adapter.weights.get(path)
            a, b = pair if pair is not None else (None, None)
            module.write_slot(slot, a, b, adapter.scale)
            module.drop_gathered()
        self._ranks[slot] = adapter.rank
        self.lora_state.version += 1  # gathered copies may hold this slot's old content

    def resident(self) -> list[str]:
        return list(self._slots)

    def stats(self) -> dict:
        return {"slots": self.num_slots, "slots_used": len(self._slots),
                "slots_busy": sum(1 for n in list(self._users.values()) if n > 0),
                "slot_hits": self.hits, "slot_misses": self.misses, "slot_evictions": self.evictions}
