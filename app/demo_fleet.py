"""The fleet part of ``sealmq demo`` (issue 16): one device enrols zero-touch with a claim, then the
backend pushes it one release-signed update, and the demo checks that the broker relayed none of
the certificate or firmware bytes.

The device ``zt-001`` is reset to factory state on every run (its key and certificate deleted, a
fresh claim issued); the release key lives in ``<demo>/release-offline/``, apart from the backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from app.bootstrap import Deployment
from backend.service import BackendService
from backend.update import push
from device.agent import DeviceAgent, DeviceConfig
from device.enrol import EnrolConfig, enrol
from pki import claim, layout, release
from pki.verify import load_chain
from runtime.mqtt import MqttSettings

DEVICE = "zt-001"


def factory_reset(dep: Deployment) -> Path:
    """The device as it leaves the factory: only its claim (and broker login), no key, no certificate."""
    keys_dir = dep.root / "release-offline"
    if not (keys_dir / release.RELEASE_KEY).exists():
        release.init_release_key(keys_dir)
    identity = layout.device_dir(dep.pki, DEVICE)
    for name in (layout.KEY, layout.CERT, layout.CHAIN, layout.CSR, release.RELEASE_PUB):
        (identity / name).unlink(missing_ok=True)
    claim.issue_claim(dep.pki, DEVICE, release_pub=keys_dir / release.RELEASE_PUB, force=True)
    return keys_dir


def run(dep: Deployment, backend: BackendService, port: int, say: Callable[[str], None]) -> list[bytes]:
    """Enrol, push, install (after :func:`factory_reset`); returns byte strings the broker must not have seen."""
    keys_dir = dep.root / "release-offline"
    mqtt = MqttSettings(port=port, username=DEVICE, password=dep.password("device", DEVICE))
    identity = layout.device_dir(dep.pki, DEVICE)
    state = dep.root / "devices" / DEVICE
    t0 = time.monotonic()
    enrol(EnrolConfig(device_id=DEVICE, claim_dir=claim.claim_dir(dep.pki, DEVICE), pki_dir=dep.pki,
                      identity_dir=identity, state_dir=state, mqtt=mqtt))
    cert = load_chain((identity / layout.CERT).read_bytes())[0].public_bytes(Encoding.DER)
    say(f"      fleet: {DEVICE} had only a claim; it made its key and got its certificate over a sealed "
        f"session in {time.monotonic() - t0:.2f} s (claim now used up: sealmq pki claim list --pki {dep.pki})")
    agent = DeviceAgent(DeviceConfig(device_id=DEVICE, identity_dir=identity, pki_dir=dep.pki, state_dir=state,
                                     mqtt=MqttSettings(port=port, username=DEVICE, client_id=f"{DEVICE}:agent",
                                                       password=mqtt.password)))
    agent.start()
    try:
        firmware = os.urandom(64 * 1024)
        src = dep.root / "release-offline" / "firmware.bin"
        src.write_bytes(firmware)
        version = agent.updates.installed_version + 1
        pkg = dep.root / "release-offline" / f"firmware-{version}.pkg"
        release.sign_package(keys_dir, src, pkg, version=version, kind="firmware", devices=(DEVICE,), force=True)
        push(dep.backend_data, DEVICE, pkg)
        deadline = time.monotonic() + 30
        while agent.updates.installed_version < version and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = agent.updates.installed_version == version
        say(f"      fleet: firmware version {version} ({len(firmware)} bytes), signed offline by the release key, "
            f"pushed by the backend: {'installed' if ok else 'NOT installed'} on {DEVICE}")
    finally:
        agent.stop()
    return [cert[-48:], firmware[:32], firmware[-32:]] if ok else []
