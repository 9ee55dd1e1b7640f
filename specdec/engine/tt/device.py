"""The one Tenstorrent device a service process owns: opened once, closed however the process ends.

A service owns exactly one device (a draft on chip 0 and a target on chip 1 are two processes), so
a second open in the same process is refused. The graceful path (SIGTERM -> server stop -> engine
close) closes it; an exit hook covers every other way out.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any, Callable

from specdec.errors import DeviceUnavailable

log = logging.getLogger(__name__)


class DeviceOwner:
    _owner_in_process: "DeviceOwner | None" = None

    def __init__(self, device_id: int, open_device: Callable[[int], Any], close_device: Callable[[Any], None]):
        self.device_id = device_id
        self._open_device = open_device
        self._close_device = close_device
        self.device: Any = None

    def open(self) -> Any:
        owner = DeviceOwner._owner_in_process
        if owner is not None:
            raise DeviceUnavailable(
                f"this process already owns device {owner.device_id}; run one service process per device"
            )
        try:
            self.device = self._open_device(self.device_id)
        except RuntimeError as e:  # ttnn reports a missing chip as TT_FATAL, a RuntimeError
            raise DeviceUnavailable(f"cannot open Tenstorrent device {self.device_id}: {tt_fatal_reason(e)}") from e
        DeviceOwner._owner_in_process = self
        atexit.register(self.close)
        log.info("opened Tenstorrent device %d", self.device_id)
        return self.device

    def close(self) -> None:
        """Idempotent: the graceful stop and the exit hook may both call it."""
        if self.device is None:
            return
        device, self.device = self.device, None
        DeviceOwner._owner_in_process = None
        atexit.unregister(self.close)
        self._close_device(device)
        log.info("closed Tenstorrent device %d", self.device_id)


def tt_fatal_reason(error: Exception) -> str:
    """The human line of a TT_FATAL message ("No chips detected in the cluster"), without the
    assertion and backtrace around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "info:" in lines and lines.index("info:") + 1 < len(lines):
        return lines[lines.index("info:") + 1]
    return lines[0] if lines else type(error).__name__
