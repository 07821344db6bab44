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
from runtime.driver import SharedTimer
from runtime.mqtt import MqttSettings
from runtime.netloop import NetworkLoop


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
        shared_threads: bool = True,
    ) -> None:
        """``shared_threads``: every device's MQTT I/O on one network thread of this process
        (runtime/netloop.py) and every device's timer on one timer thread
        (runtime.driver.SharedTimer); False: two threads per device (paho's loop and a timer), as
        a lone agent runs."""
        self.agents: list[DeviceAgent] = []
        self.network = NetworkLoop(name="simulator-net") if shared_threads else None
        self.timer = SharedTimer(name="simulator-timer") if shared_threads else None
        for device_id in device_ids:
            identity_dir = layout.device_dir(pki_dir, device_id)
            settings = replace(mqtt, username=device_id,
                               password=password_for(device_id) if password_for else mqtt.password)
            if mqtt.tls_ca is not None and mqtt.tls_cert is None and (identity_dir / layout.CHAIN).exists():
                # over TLS each device logs in with its own EDHOC certificate, not a password
                settings = replace(settings, password=None, tls_cert=identity_dir / layout.CHAIN,
                                   tls_key=identity_dir / layout.KEY)
            config = DeviceConfig(
                device_id=device_id,
                identity_dir=identity_dir,
                pki_dir=pki_dir,
                state_dir=state_root / device_id,
                mqtt=settings,
            )
            if config_hook is not None:
                config = config_hook(config)
            self.agents.append(DeviceAgent(config, network=self.network, timer=self.timer))

    def start(self, timeout: float = 60.0, stop: threading.Event | None = None) -> float:
        """Connect every device and wait for every handshake, ``timeout`` seconds at most.

        Returns the seconds it took (some devices may still lack a session: see
        :meth:`established`). Raises :class:`~sealmq.errors.TransportError` at once if the broker
        refuses a device's credentials, or at the timeout if no device could reach the broker.
        """
        t0 = time.monotonic()
        for agent in self.agents:
            agent.start(wait=None)  # connects in the background: a down broker must not block the others
        deadline = t0 + timeout
        while not all(a.established.is_set() for a in self.agents):
            self.raise_refusal()
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                break
            time.sleep(0.05)
        if not any(a.link.ever_connected for a in self.agents) and not (stop is not None and stop.is_set()):
            self.agents[0].link.wait_connected(0, raise_on_timeout=True)
        return time.monotonic() - t0

    def raise_refusal(self) -> None:
        """Raise the broker's refusal of a device's credentials, if there was one."""
        for agent in self.agents:
            if agent.link.error is not None:
                raise agent.link.error

    def run(self, duration: float, interval: float, stop: threading.Event | None = None) -> int:
        """Every device sends telemetry every ``interval`` seconds for ``duration`` seconds.

        Returns the number of records handed to devices that had a session (the others' are queued).
        """
        step = 0
        sent = 0
        end = time.monotonic() + duration
        while time.monotonic() < end and not (stop and stop.is_set()):
            for agent in self.agents:
                if agent.established.is_set():
                    sent += 1
                agent.send_telemetry(telemetry_for(agent.config.device_id, step))
            step += 1
            if stop is not None:
                stop.wait(min(interval, max(0.0, end - time.monotonic())))
            else:
                time.sleep(min(interval, max(0.0, end - time.monotonic())))
        return sent

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.network is not None:
            self.network.stop()
        if self.timer is not None:
            self.timer.stop()

    def established(self) -> int:
        return sum(1 for a in self.agents if a.endpoint.established)
