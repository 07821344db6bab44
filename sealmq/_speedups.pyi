"""Types of the compiled record framing (sealmq/_speedups.c). See the C source for what each does."""

from typing import Any

def seal(aead: Any, base: bytes, header: bytes, prefixes: tuple[bytes, ...], suffix: bytes, piv: int,
         plaintext: bytes, tag_len: int) -> bytes: ...
def open_hot(data: bytes, topic: str, state: tuple[Any, ...], window: Any) -> tuple[Any, int, bytes] | None: ...
