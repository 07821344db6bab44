"""The device simulator: N enrolled devices in one process, publishing telemetry (and media).

Each simulated device is a real :class:`~device.agent.DeviceAgent` with its own key, certificate
and MQTT connection; only the sensor values are made up. Used by ``sealmq device simulate``,
the demo and the load benchmark.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from device.agent import DeviceAgent, DeviceConfig
from pki import layout
from runtime.mqtt import MqttSettings


@dataclass
class SimulationResult:
    devices: int
    established: int
    telemetry_sent: int
    handshake_seconds: float
    key_updates: int


MEDIA_SUFFIXES = frozenset({".png", ".apng", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".webm", ".avi", ".mjpeg"})


def media_files(folder: Path) -> list[Path]:
    """Images and videos in ``folder`` (by suffix), sorted: what the simulator and the demo send."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)


def telemetry_for(device_id: str, step: int) -> dict[str, float | int | str]:
    """Plausible sensor values (a daily temperature curve plus noise)."""
    phase = (hash(device_id) % 100) / 100.0
    return {
        "temperature_c": round(21.0 + 4.0 * math.sin(step / 20.0 + phase * 6.28) + random.uniform(-0.2, 0.2), 2),  # noqa: S311
        "humidity_pct": round(45.0 + 10.0 * math.cos(step / 30.0 + phase), 1),
        "battery_pct": max(0, 100 - step // 50),
        "step": step,
    }


class Simulator:
    def __init__(
        self,
        pki_dir: Path,
        state_root: Path,
        device_ids: Sequence[str],
        mqtt: MqttSettings,
        *,
        password_for: Callable[[str], str | None] | None = None,
        config_hook: Callable[[DeviceConfig], DeviceConfig] | None = None,
    ) -> None:
        self.agents: list[DeviceAgent] = []
        for device_id in device_ids:
            settings = replace(mqtt, username=device_id,
                               password=password_for(device_id) if password_for else mqtt.password)
            config = DeviceConfig(
                device_id=device_id,
                identity_dir=layout.device_dir(pki_dir, device_id),
                pki_dir=pki_dir,
                state_dir=state_root / device_id,
                mqtt=settings,
            )
            if config_hook is not None:
                config = config_hook(config)
            self.agents.append(DeviceAgent(config))

    def start(self, timeout: float = 60.0) -> float:
        """Connect every device and wait for every handshake; returns the seconds it took."""
        t0 = time.monotonic()
        for agent in self.agents:
            agent.start(wait=timeout)
        deadline = t0 + timeout
        for agent in self.agents:
            agent.wait_established(max(0.0, deadline - time.monotonic()))
        return time.monotonic() - t0

    def run(self, duration: float, interval: float, stop: threading.Event | None = None) -> int:
        """Every device sends telemetry every ``interval`` seconds for ``duration`` seconds."""
        step = 0
        end = time.monotonic() + duration
        while time.monotonic() < end and not (stop and stop.is_set()):
            for agent in self.agents:
                agent.send_telemetry(telemetry_for(agent.config.device_id, step))
            step += 1
            time.sleep(interval)
        return step * len(self.agents)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()

    def established(self) -> int:
        return sum(1 for a in self.agents if a.endpoint.established)
