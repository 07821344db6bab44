"""Harness for end-to-end tests: a real broker (embedded amqtt or a mosquitto child process),
the real backend service and real device agents, all with a real PKI made by the test."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from app.bootstrap import Deployment, bootstrap
from backend.service import BackendService, BackendSettings
from broker.embedded import EmbeddedBroker, EmbeddedBrokerConfig
from broker.mosquitto_config import MosquittoOptions, current_user, write_config
from broker.passwd import AccountRole, add_user, load_users
from broker.tls import TlsFiles
from device.agent import DeviceAgent, DeviceConfig
from pki import layout
from runtime.audit import read_audit
from runtime.mqtt import MqttLink, MqttSettings
from sealmq.endpoint import BackendConfig, EndpointConfig
from tests.brokers import MOSQUITTO, MosquittoProcess, free_port, wait_listening

HOST = "127.0.0.1"
SUB_MONITOR = "monitor-sub"
FAST = {"reconnect_min_delay": 1, "reconnect_max_delay": 2}


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Recorder:
    """A wildcard subscriber (the monitor user): records everything the broker relays."""

    def __init__(self, system: System, topic_filter: str = "sealmq/#") -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        settings = system.mqtt("monitor", "monitor", client_id=f"monitor:rec{id(self)}", clean_session=True)
        self.link = MqttLink(settings, self._on, [topic_filter])
        self.link.start()
        system.closers.append(self.stop)  # a test that forgets it must not leave a link retrying forever

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def stop(self) -> None:
        self.link.stop()


class MosquittoSub:
    """``mosquitto_sub -t 'sealmq/#' -v -F '%t %x'``: topic and payload as hex, as the README shows."""

    def __init__(self, system: System) -> None:
        exe = shutil.which("mosquitto_sub")
        assert exe is not None
        self.out = system.root / f"mosquitto_sub-{id(self)}.txt"
        self._f = open(self.out, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [exe, "-h", HOST, "-p", str(system.port), "-u", SUB_MONITOR, "-P", system.sub_password,
             "-i", f"{SUB_MONITOR}:sub{id(self)}", "-t", "sealmq/#", "-v", "-F", "%t %x", "-q", "1"],
            stdout=self._f, stderr=subprocess.STDOUT,
        )
        time.sleep(0.5)

    def stop(self) -> list[tuple[str, bytes]]:
        self.proc.terminate()
        self.proc.wait(5)
        self._f.close()
        lines = self.out.read_text().splitlines()
        result = []
        for line in lines:
            topic, _, hex_ = line.partition(" ")
            result.append((topic, bytes.fromhex(hex_)))
        return result


class System:
    def __init__(self, root: Path, device_ids: list[str], broker: str = "amqtt", *, key_type: str = "p256",
                 backend_key_types: tuple[str, ...] | None = None, tls: bool = False,
                 **broker_options: Any) -> None:
        """With ``tls`` the broker also serves mqtts, and devices and backend log in there with the
        certificates they use for EDHOC; monitors keep their passwords on the plain listener."""
        self.root = root
        self.kind = broker
        self.dep: Deployment = bootstrap(root, device_ids, iterations=1000, key_type=key_type,
                                         backend_key_types=backend_key_types)[0]
        # a second monitor login for mosquitto_sub: mosquitto binds the client id to the user name,
        # so two connections of one user would keep replacing each other
        self.sub_password = secrets.token_urlsafe(12)
        add_user(self.dep.users, SUB_MONITOR, self.sub_password, AccountRole.MONITOR, iterations=1000)
        self.broker_options = broker_options
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        if tls:
            self.broker_options.update(tls=TlsFiles.from_pki(self.dep.pki), tls_port=self.tls_port)
        self._broker: Any = None
        self.backend: BackendService | None = None
        self.db: str | None = None  # the backend's database (BackendSettings.db): None is SQLite under its data
        self.agents: dict[str, DeviceAgent] = {}
        self.closers: list[Callable[[], Any]] = []
        self.start_broker()

    # -- broker ------------------------------------------------------------------------------
    def start_broker(self) -> None:
        if self.kind == "amqtt":
            cfg = EmbeddedBrokerConfig(passwd=self.dep.users, port=self.port, **self.broker_options)
            self._broker = EmbeddedBroker(cfg).start()
        else:
            assert MOSQUITTO is not None
            conf_dir = self.root / "mosquitto"
            write_config(conf_dir, load_users(self.dep.users),
                         MosquittoOptions(host=HOST, port=self.port,
                                          **{"run_as": current_user(), **self.broker_options}))
            self._broker = MosquittoProcess(conf_dir, self.port, self.root / "mosquitto.log").start()
        wait_listening(HOST, self.port)

    def stop_broker(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def restart_broker(self, downtime: float = 0.5) -> None:
        self.stop_broker()
        time.sleep(downtime)
        self.start_broker()

    def mqtt(self, role: str, name: str, **kw: Any) -> MqttSettings:
        if self.tls_port and role in {"device", "backend"}:
            d = layout.device_dir(self.dep.pki, name) if role == "device" else layout.backend_dir(self.dep.pki, name)
            return MqttSettings(host=HOST, port=self.tls_port, username=name, tls_ca=layout.anchor(self.dep.pki),
                                tls_cert=d / layout.CHAIN, tls_key=d / layout.KEY, **{**FAST, **kw})
        return MqttSettings(host=HOST, port=self.port, username=name, password=self.dep.password(role, name),
                            **{**FAST, **kw})

    # -- backend and devices -----------------------------------------------------------------
    def start_backend(self, config: BackendConfig | None = None) -> BackendService:
        svc = BackendService(BackendSettings(pki_dir=self.dep.pki, data_dir=self.dep.backend_data,
                                             mqtt=self.mqtt("backend", "backend"), poll_interval=0.1,
                                             endpoint=config or BackendConfig(), db=self.db))
        svc.start()
        self.backend = svc
        return svc

    def stop_backend(self) -> None:
        if self.backend is not None:
            self.backend.stop()
            self.backend = None

    def agent(self, device_id: str, *, broker_user: str | None = None, identity: str | None = None,
              pki_dir: Path | None = None, endpoint: EndpointConfig | None = None, start: bool = True,
              wait: bool = True, poll_interval: float = 0.05) -> DeviceAgent:
        user = broker_user or device_id
        cfg = DeviceConfig(
            device_id=device_id,
            identity_dir=layout.device_dir(pki_dir or self.dep.pki, identity or device_id),
            pki_dir=self.dep.pki,
            state_dir=self.dep.device_state(device_id),
            mqtt=self.mqtt("device", user, client_id=f"{user}:{identity or 'agent'}-{len(self.agents)}"),
            poll_interval=poll_interval,
            endpoint=endpoint or EndpointConfig(handshake_timeout=3.0),
        )
        if identity is not None:
            # an impostor: its certificate names another device; load it under that name
            cfg = replace(cfg, device_id=identity)
        agent = DeviceAgent(cfg)
        if identity is not None:
            agent.endpoint = _retarget(agent, device_id)
        if start:
            agent.start()
            if wait:
                assert agent.wait_established(10), f"{device_id}: no session ({agent.counters})"
        self.agents[f"{device_id}/{id(agent)}"] = agent
        return agent

    def audit(self) -> list[dict[str, Any]]:
        return read_audit(self.dep.backend_data / "audit" / "server_log.jsonl")

    def close(self) -> None:
        for closer in reversed(self.closers):
            closer()
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop()
        self.stop_backend()
        self.stop_broker()


def _retarget(agent: DeviceAgent, device_id: str) -> Any:
    """Make ``agent`` speak on ``device_id``'s topics with its own (other) identity."""
    from sealmq.endpoint import DeviceEndpoint

    old = agent.endpoint
    new = DeviceEndpoint(device_id=device_id, credential=old.credential, trust_store=old.trust_store,
                         config=old.config)
    agent.link._subscriptions = list(new.subscriptions)
    return new
