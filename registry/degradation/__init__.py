"""Degradation: notice Redis failing within tens of milliseconds, tell it from a busy
Redis, keep serving, lose nothing acknowledged, and come back by itself.

The parts, each small (after redis-py's ``multidb``: circuit, failure detector,
failover):

- ``detector``: the failure detector thread (down, not busy);
- ``manager``: the modes, the breaker, and where each write goes (``Degradation``);
- ``commands``: one typed command per write RPC, run live and on replay;
- ``buffer`` and ``journal``: writes acknowledged while Redis could not take them, kept
  in order, in memory and on disk;
- ``local_slots``: slots granted from the local view while degraded (policy ``local``);
- ``recovery``: back to NORMAL, catch up, drain the buffer in bounded rounds.
"""

from registry.degradation.buffer import BufferFull, WriteBuffer
from registry.degradation.commands import (
    Command,
    Deregister,
    Drain,
    PutPool,
    Register,
    ReleaseSlot,
    ReserveLocal,
)
from registry.degradation.detector import Detector, Thresholds
from registry.degradation.journal import Journal, JournalLocked
from registry.degradation.local_slots import LocalSlots
from registry.degradation.manager import Degradation, Mode
from registry.degradation.recovery import adopt_window, spec_of

__all__ = [
    "BufferFull",
    "Command",
    "Degradation",
    "Deregister",
    "Detector",
    "Drain",
    "Journal",
    "JournalLocked",
    "LocalSlots",
    "Mode",
    "PutPool",
    "Register",
    "ReleaseSlot",
    "ReserveLocal",
    "Thresholds",
    "WriteBuffer",
    "adopt_window",
    "spec_of",
]
