"""Byzantine behaviours for fault tests: a validator that lies on purpose.

Test-only. The validator process enables one mode with the hidden ``--byzantine MODE`` flag,
and only when ``MEDCHAIN_ALLOW_BYZANTINE=1`` is set in its environment, so a production
deployment cannot switch it on by a stray argument. Each mode rewrites what the otherwise
honest replica sends, re-signing with the validator's real key where the lie must look
authentic:

- ``equivocate``: as primary, send every backup a *different* pre-prepare for the same
  sequence number (different time, so a different batch digest, each validly signed);
- ``bad-signatures``: corrupt the signature of everything it sends;
- ``replay``: keep re-sending messages it sent earlier (old views, old sequence numbers);
- ``wrong-view``: claim a later view in its votes and a far later one in its status.
"""

from __future__ import annotations

import dataclasses
import random

from ledger.blocks import batch_digest, tx_root
from ledger.messages import (
    Commit,
    Prepare,
    PrePrepare,
    Status,
    decode_frame,
    encode_frame,
)
from ledger.quorum import Signer
from ledger.ready import BROADCAST

__all__ = ["MODES", "Byzantine", "ENV_FLAG"]

MODES = ("equivocate", "bad-signatures", "replay", "wrong-view")
ENV_FLAG = "MEDCHAIN_ALLOW_BYZANTINE"


class Byzantine:
    def __init__(self, mode: str, signer: Signer, n: int, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown byzantine mode {mode!r}; choose from {MODES}")
        self.mode, self.signer, self.n = mode, signer, n
        self.rng = random.Random(seed)
        self.history: list[tuple[int, bytes]] = []
        self.lies = 0

    def _resign(self, msg) -> bytes:
        signed, body = self.signer.sign(msg)
        return encode_frame(signed, body)

    def outgoing(self, dest: int, frame: bytes) -> list[tuple[int, bytes]]:
        """What actually leaves instead of ``(dest, frame)``."""
        msg, body = decode_frame(frame)
        if self.mode == "equivocate":
            if isinstance(msg, PrePrepare) and msg.requests and dest == BROADCAST:
                out = []
                for backup in range(self.n):
                    if backup == self.signer.id:
                        continue
                    t = msg.t + 1 + backup  # a different proposal for every backup
                    d = batch_digest(msg.seq, t, tx_root(msg.requests))
                    out.append((backup, self._resign(
                        dataclasses.replace(msg, t=t, digest=d, sig=b""))))
                self.lies += 1
                return out
            return [(dest, frame)]
        if self.mode == "bad-signatures":
            if not getattr(msg, "sig", b""):
                return [(dest, frame)]
            sig = bytearray(msg.sig)
            sig[self.rng.randrange(len(sig))] ^= 1 << self.rng.randrange(8)
            self.lies += 1
            return [(dest, encode_frame(dataclasses.replace(msg, sig=bytes(sig)), body))]
        if self.mode == "replay":
            out = [(dest, frame)]
            if len(self.history) < 500:
                self.history.append((dest, frame))
            if len(self.history) > 50:  # once there is a past, keep dragging it back up
                for _ in range(3):
                    out.append(self.history[self.rng.randrange(len(self.history) // 2)])
                    self.lies += 1
            return out
        # wrong-view
        if isinstance(msg, (Prepare, Commit, PrePrepare)):
            self.lies += 1
            return [(dest, self._resign(dataclasses.replace(msg, view=msg.view + 1, sig=b"")))]
        if isinstance(msg, Status):
            self.lies += 1
            return [(dest, self._resign(dataclasses.replace(msg, view=msg.view + 1000, sig=b"")))]
        return [(dest, frame)]
