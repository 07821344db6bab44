"""The capability claims of docs/protocol.md and docs/pki.md, checked against the code they describe.

Each doc holds its claims in tables between ``<!-- claims:NAME -->`` and ``<!-- /claims -->``; this
module parses those tables and computes every value from the code (suites a credential fits, the
suites a backend with a given set of credentials serves, methods, credential kinds, key types,
encoding rules), so changing either side without the other fails here. A few claims stated in
prose elsewhere in the docs (the CDDL's suite list, the encoding rules) are checked against the
same values, so the docs cannot contradict themselves either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from backend.service import BackendService, BackendSettings
from pki import ccs as pki_ccs
from pki import keys, layout, store
from pki.verify import MIN_RSA_BITS, describe_public_key
from runtime.mqtt import MqttSettings
from sealmq import cbor
from sealmq.edhoc import PREFERRED_SUITES, SUITES, LocalCredential, X509Credential, handshake, suites_for, wire
from sealmq.edhoc import ccs as edhoc_ccs
from sealmq.endpoint import BackendConfig, BackendEndpoint
from sealmq.errors import DecodeError, SealmqError
from sealmq.identity import CredentialKind
from sealmq.session import Session
from tests.pki_fixtures import make_pki

DOCS = Path(__file__).resolve().parents[1] / "docs"


def claims(doc: str, name: str) -> list[list[str]]:
    """The rows (cells stripped of backticks) of the table marked ``claims:name`` in ``doc``."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    m = re.search(rf"<!-- claims:{re.escape(name)} -->\n(.*?)\n<!-- /claims -->", text, re.S)
    assert m, f"{doc}: no claims table {name!r}"
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip().startswith("|")]
    rows = [[c.strip().replace("`", "") for c in ln.strip("|").split("|")] for ln in lines]
    assert len(rows) > 2 and set(rows[1][0]) <= set("-: "), f"{doc}: {name} is not a table"
    return rows[2:]


def ints(cell: str) -> list[int]:
    return [] if cell.strip() in ("-", "") else [int(x) for x in cell.split(",")]


def words(cell: str) -> list[str]:
    return [x.strip() for x in cell.split(",") if x.strip()]


# -- credentials of every kind, from a real PKI ------------------------------------------------

@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalCredential]:
    pki = make_pki(tmp_path_factory.mktemp("pki"), [])
    backend = layout.backend_dir(pki.path)
    for kt in ("ed25519", "rsa2048"):
        store.enroll(pki.path, "backend", "backend", kt, extra=True)
    pki_ccs.issue_ccs(pki.path, "backend", "backend")

    def x509(d: Path) -> X509Credential:
        ident = store.load_identity(d)
        chain = [c.public_bytes(Encoding.DER) for c in ident.chain]
        return X509Credential(private_key=ident.private_key, chain_der=chain)

    return {
        "p256": x509(backend), "ed25519": x509(layout.extra_dir(backend, "ed25519")),
        "rsa": x509(layout.extra_dir(backend, "rsa2048")),
        "ccs": pki_ccs.load_credential(pki.path, "backend", "backend"),
    }


def _credential_named(text: str) -> str:
    """'X.509, Ed25519 key' -> 'ed25519'; 'CCS, P-256 ...' -> 'ccs'."""
    t = text.lower()
    if t.startswith("ccs"):
        return "ccs"
    for key, name in (("p-256", "p256"), ("ed25519", "ed25519"), ("rsa", "rsa")):
        if key in t:
            return name
    raise AssertionError(f"unknown credential in the docs: {text!r}")


def test_suites_each_credential_fits(creds: dict[str, LocalCredential]) -> None:
    rows = claims("protocol.md", "credential-suites")
    assert {_credential_named(r[0]) for r in rows} == set(creds)  # every kind of credential is listed
    for credential, fits in rows:
        assert list(suites_for(creds[_credential_named(credential)])) == ints(fits), credential


def _backend_holds(text: str, creds: dict[str, LocalCredential]) -> list[LocalCredential]:
    t = text.lower()
    held = [creds[k] for k, word in (("p256", "p-256"), ("ed25519", "ed25519"), ("rsa", "rsa")) if word in t]
    return [*held, creds["ccs"]] if "ccs" in t else held


def test_suites_a_backend_serves_for_the_credentials_it_holds(creds: dict[str, LocalCredential]) -> None:
    for holds, method_0, method_3 in claims("protocol.md", "backend-suites"):
        held = _backend_holds(holds, creds)
        # the backend service adds method 3 when it holds a CCS (test_backend_methods below)
        methods = (0, 3) if creds["ccs"] in held else (0,)
        backend = BackendEndpoint(credentials=held, trust_store=None, config=BackendConfig(methods=methods))
        served = backend.served_suites()
        assert served.get(0, []) == ints(method_0), holds
        assert served.get(3, []) == ints(method_3), holds


def _capabilities() -> dict[str, str]:
    return {r[0]: r[1] for r in claims("protocol.md", "capabilities")}


def _opens_a_session(suite: int) -> bool:
    s = SUITES[suite]
    try:
        Session.from_edhoc(prk_out=bytes(s.hash_length), c_i=b"\x01", c_r=b"\x02", is_initiator=True,
                           device_id="d", now=0.0, hash_name=s.app_hash, app_aead=s.app_aead)
    except SealmqError:
        return False
    return True


def _backend_methods(tmp: Path, *, with_ccs: bool) -> str:
    pki = make_pki(tmp / "pki", [])
    if with_ccs:
        pki_ccs.issue_ccs(pki.path, "backend", "backend")
    svc = BackendService(BackendSettings(pki_dir=pki.path, data_dir=tmp / "data", mqtt=MqttSettings()))
    try:
        return ", ".join(str(m) for m in svc.endpoint.config.methods)
    finally:
        svc.storage.close()
        svc.audit.close()


def _x5t_accepted() -> list[int]:
    ok = []
    for alg in range(-64, 64):
        try:
            wire.x5t_hash(alg, b"cert")
        except SealmqError:
            continue
        ok.append(alg)
    return ok


def _simple_values_accepted() -> list[str]:
    names = {False: "false", True: "true", None: "null"}
    heads = [bytes([0xE0 + v]) for v in range(20)] + [b"\xf4", b"\xf5", b"\xf6", b"\xf7"] \
        + [bytes([0xF8, v]) for v in range(256)]
    got = []
    for data in heads:
        try:
            got.append(names[cbor.loads(data)])
        except DecodeError:
            continue
    return got


def _max_depth() -> int:
    depth = 0
    while True:
        try:
            cbor.loads(bytes([0x81] * (depth + 1)) + b"\x00")
        except DecodeError:
            return depth
        depth += 1


CAPABILITIES: dict[str, Callable[[Path], str]] = {
    "cipher suites implemented": lambda _: ", ".join(map(str, sorted(SUITES))),
    "suites that can open a session": lambda _: ", ".join(str(s) for s in sorted(SUITES) if _opens_a_session(s)),
    "suites preferred by default, in order": lambda _: ", ".join(
        map(str, PREFERRED_SUITES if BackendConfig().suites == PREFERRED_SUITES else ("differ",))),
    "EDHOC methods implemented": lambda _: ", ".join(map(str, handshake.METHODS)),
    "methods of BackendConfig by default": lambda _: ", ".join(map(str, BackendConfig().methods)),
    "methods the backend service serves without its own CCS": lambda t: _backend_methods(t / "a", with_ccs=False),
    "methods the backend service serves with its own CCS": lambda t: _backend_methods(t / "b", with_ccs=True),
    "ID_CRED_x labels: kid, kccs, x5chain, x5t": lambda _: ", ".join(
        map(str, (wire.HDR_KID, edhoc_ccs.HDR_KCCS, wire.HDR_X5CHAIN, wire.HDR_X5T))),
    "x5t hash algorithms: sent by default, also accepted": lambda _: ", ".join(
        map(str, [X509Credential.x5t_alg, *(a for a in _x5t_accepted() if a != X509Credential.x5t_alg)])),
    "CBOR nesting depth at most": lambda _: str(_max_depth()),
    "CBOR simple values accepted": lambda _: ", ".join(_simple_values_accepted()),
}


@pytest.mark.parametrize("claim", sorted(CAPABILITIES))
def test_capability_claims(claim: str, tmp_path: Path) -> None:
    documented = _capabilities()
    assert claim in documented, f"docs/protocol.md no longer states {claim!r}"
    assert documented[claim] == CAPABILITIES[claim](tmp_path)


def test_every_capability_row_is_checked() -> None:
    assert set(_capabilities()) == set(CAPABILITIES)


def test_prose_agrees_with_the_tables() -> None:
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    implemented = re.search(r"suite = int\s*; implemented: ([-0-9, ]+)", text)
    assert implemented and ints(implemented.group(1)) == sorted(SUITES)
    rules = re.search(r"Encoding rules for every message:(.*?)\n\n", text, re.S)
    assert rules
    prose = " ".join(rules.group(1).split())
    assert f"nesting at most {_max_depth()} deep" in prose
    assert "the simple values `false`, `true` and `null`" in prose
    assert "no tags, no `undefined`, no other simple value" in prose


def test_frames_use_only_the_simple_values_the_rules_allow() -> None:
    # the rule names the frames: their prefixes `true` and `null` are plain CBOR the decoder accepts
    from sealmq.endpoint.framing import NULL_PREFIX, TRUE_PREFIX

    assert cbor.loads(TRUE_PREFIX) is True and cbor.loads(NULL_PREFIX) is None
    text = " ".join((DOCS / "protocol.md").read_text(encoding="utf-8").split())
    assert "(the handshake frames and command arguments use them)" in text


# -- the encoding rules as stated in prose ----------------------------------------------------

@pytest.mark.parametrize(("hex_", "ok"), [
    ("f93e00", True),                   # 1.5 in its shortest exact form (half precision)
    ("fa3fc00000", False),              # 1.5 as a float32
    ("fb3ff8000000000000", False),      # 1.5 as a float64
    ("fb3ff199999999999a", True),       # 1.1 has no shorter exact form
    ("c11a00000000", False),            # a tag
    ("f7", False),                      # undefined
    ("a26176a06174 01".replace(" ", ""), False),  # map keys not bytewise sorted
    ("5f41ffff", False),                # indefinite length
])
def test_encoding_rules_as_documented(hex_: str, ok: bool) -> None:
    data = bytes.fromhex(hex_)
    if ok:
        cbor.loads(data)
    else:
        with pytest.raises(DecodeError):
            cbor.loads(data)


# -- docs/pki.md -----------------------------------------------------------------------------

def _sign_accepts() -> str:
    candidates: list[tuple[str, Any]] = [
        ("p256", ec.generate_private_key(ec.SECP256R1())), ("p384", ec.generate_private_key(ec.SECP384R1())),
        ("p521", ec.generate_private_key(ec.SECP521R1())), ("ed25519", ed25519.Ed25519PrivateKey.generate()),
        ("ed448", ed448.Ed448PrivateKey.generate()),
    ]
    accepted = []
    for name, key in candidates:
        try:
            describe_public_key(key.public_key())
        except SealmqError:
            continue
        accepted.append(name)
    weak = rsa.generate_private_key(65537, 1024).public_key()
    with pytest.raises(SealmqError):
        describe_public_key(weak)
    describe_public_key(rsa.generate_private_key(65537, MIN_RSA_BITS).public_key())
    return ", ".join([*accepted, f"rsa >= {MIN_RSA_BITS}"])


def _ccs_key_type(tmp: Path) -> str:
    pki = make_pki(tmp / "ccs", [])
    pki_ccs.issue_ccs(pki.path, "backend", "backend")
    key = keys.from_pem((layout.backend_dir(pki.path) / layout.CCS_KEY).read_bytes(), None)
    pki_ccs.load_credential(pki.path, "backend", "backend")  # the CCS fits that key
    return keys.key_type_of(key)


PKI_CLAIMS: dict[str, Callable[[Path], str]] = {
    "CA key types (init --key-type)": lambda _: ", ".join(keys.CA_KEY_TYPES),
    "leaf key types (keygen, enroll, bootstrap --key-type, --backend-key-types)": lambda _: ", ".join(
        keys.LEAF_KEY_TYPES),
    "keys sign accepts in a CSR": lambda _: _sign_accepts(),
    "credential kinds a peer authenticates with": lambda _: ", ".join(k.value for k in CredentialKind),
    "CCS key type": _ccs_key_type,
    "CCS kid length (bytes)": lambda _: str(pki_ccs.KID_LENGTH),
}


def _pki_claims() -> Iterator[tuple[str, str]]:
    for row in claims("pki.md", "pki"):
        yield row[0], row[1]


def test_pki_claims(tmp_path: Path) -> None:
    documented = dict(_pki_claims())
    assert set(documented) == set(PKI_CLAIMS)
    for claim, value in documented.items():
        assert value == PKI_CLAIMS[claim](tmp_path), claim


def test_command_synopsis_lists_the_same_key_types() -> None:
    text = (DOCS / "pki.md").read_text(encoding="utf-8")
    for command, allowed in (("init", keys.CA_KEY_TYPES), ("keygen", keys.LEAF_KEY_TYPES)):
        m = re.search(rf"sealmq pki {command} .*?\[--key-type ([a-z0-9|]+)\]", text)
        assert m and m.group(1).split("|") == list(allowed), command


def test_cli_choices_follow_the_key_types() -> None:
    from app.demo import _KEY_TYPES

    assert list(_KEY_TYPES) == words(dict(_pki_claims())[
        "leaf key types (keygen, enroll, bootstrap --key-type, --backend-key-types)"])
