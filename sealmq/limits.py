"""Key-usage and size limits for sealed records (AES-CCM-16-64-128, A128GCM), with where each number comes from.

AEAD limits. draft-ietf-core-oscore-key-limits ("Key Usage Limits for OSCORE", section "Limits for
'q' and 'v'") recommends, specifically for AEAD_AES_128_CCM_8 (= COSE alg 10, AES-CCM-16-64-128,
8-byte tag), the triplet::

    q = 2**20   messages encrypted under one Sender Key
    v = 2**14   failed decryptions (forgery attempts) against one Recipient Key
    l = 2**8    blocks (4 KiB) per message

which keeps both the confidentiality advantage CA and the integrity advantage IA at or below the
2**-50 threshold of draft-irtf-cfrg-aead-limits. IA is dominated by ``v / 2**64`` for a 64-bit tag
(2**14 / 2**64 = 2**-50), which is why ``v`` is so much smaller than for 16-byte-tag AEADs (2**20).

Our media chunks can be far longer than 4 KiB (up to :data:`MAX_PLAINTEXT`, i.e. l = 2**12 blocks).
The CCM term of the bounds grows as ``(2 * l * (q + v))**2 / 2**128``; with l = 2**12 and q = 2**20
it is (2**33)**2 / 2**128 = 2**-62, still well under 2**-50, so q and v stay as the draft says.

Sessions under suite 6 (A128GCM, 16-byte tag) and 24 (A256GCM) keep the same q and v: for GCM,
draft-irtf-cfrg-aead-limits bounds CA by ``(q * (l + 1))**2 / 2**129`` = (2**32)**2 / 2**129 = 2**-65
with l = 2**12 and IA by ``2 * v * (l + 1) / 2**128``, about 2**-101 at v = 2**14, so both sit much
further below 2**-50 than CCM_8's; one set of limits serves every suite.

Practical defaults (``sealmq.session.SessionConfig``) sit far below the hard limits: a key update
is due after :data:`KEY_UPDATE_AFTER_RECORDS` = 2**16 records or :data:`KEY_UPDATE_AFTER_SECONDS`
= 1 hour, so a session never gets near ``q``; a context that reaches ``v`` failed decryptions is
closed (``SessionError(KEY_LIMIT_REACHED)``) and the caller runs a new EDHOC handshake.
"""

from __future__ import annotations

from sealmq.oscore import AEAD_ALGORITHMS, MAX_SEQUENCE_NUMBER

# draft-ietf-core-oscore-key-limits, AEAD_AES_128_CCM_8
LIMIT_Q = 2**20
LIMIT_V = 2**14
LIMIT_L_BLOCKS = 2**8

KEY_UPDATE_AFTER_RECORDS = 2**16
KEY_UPDATE_AFTER_SECONDS = 3600.0

# AES-CCM with a 13-byte nonce has a 2-byte length field: plaintexts of 65,536 bytes or more are
# refused by the primitive itself.
MAX_PLAINTEXT = 2**16 - 1  # the record format's bound for every AEAD (GCM itself would allow more)
# A record's ciphertext carries the AEAD's tag: 8 bytes for AES-CCM-16-64-128, 16 for GCM. The
# decoder, which does not know the session's AEAD, accepts both bounds; the AEAD refuses the rest.
MIN_TAG_LENGTH = min(a.tag_length for a in AEAD_ALGORITHMS.values())
MAX_TAG_LENGTH = max(a.tag_length for a in AEAD_ALGORITHMS.values())
MAX_KID_LENGTH = 8
MAX_PIV = MAX_SEQUENCE_NUMBER  # 2**40 - 1 (a 5-byte Partial IV)
MAX_EPOCH = 2**32 - 1
# Array head, kind, kid, epoch and piv encodings and the ciphertext head fit in 40 bytes.
MAX_RECORD_SIZE = MAX_PLAINTEXT + MAX_TAG_LENGTH + 40

REPLAY_WINDOW = 256
MAX_BUFFERED_RECORDS = 64
GRACE_SECONDS = 30.0
KEY_UPDATE_NONCE_LENGTH = 8
MIN_KEY_UPDATE_NONCE = 8
MAX_KEY_UPDATE_NONCE = 32
