"""Off-chain storage of sealed envelopes: ciphertext only, content-addressed.

The ciphertext of an envelope is one *pack*: its chunk bodies end to end, stored under the
Merkle root of their digests — the content address of the whole object, which the ledger
records — and each chunk is checked against its own digest when read. The signed header
is stored last, under the envelope id. An envelope *exists* exactly when its header does,
so a crash mid-write leaves at most an unreferenced pack (removed by
:meth:`collect_garbage`), never a half object. Every write is atomic and idempotent:
storing the same envelope twice changes nothing. A read checks that the header stored under
an id is that id's (:class:`ObjectMismatch` otherwise): a swapped file is refused, not
served. One pack rather than a file per chunk
keeps it at two durable writes per object, which is what ingest throughput is bound by.

Two backends share that logic and differ only in five key/value operations: local files
(the default: temporary name, fsync, rename, fsync of the directory) and S3-compatible
object storage through boto3 (a PUT is atomic there). The store never sees a key.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from medchain.canonical import canonical_bytes, decode
from medchain.durable import durable_write
from medchain.protocol import Envelope, EnvelopeHeader

from cloud.errors import ObjectMismatch, ObjectMissing, ObjectStoreError

__all__ = ["ObjectStore", "LocalObjectStore", "S3ObjectStore", "ObjectStoreError", "ObjectMissing",
           "ObjectMismatch", "open_store"]


def _check_id(envelope_id: str) -> str:
    if len(envelope_id) != 32 or not all(c in "0123456789abcdef" for c in envelope_id):
        raise ObjectMissing(f"{envelope_id!r} is not an envelope id")
    return envelope_id


class ObjectStore:
    """Envelope-level operations over a small key/value backend (the five ``_`` methods)."""

    def _exists(self, key: str) -> bool:
        raise NotImplementedError

    def _read(self, key: str) -> bytes:
        """The value, or :class:`ObjectMissing`."""
        raise NotImplementedError

    def _write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def _list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modification time) of every key under ``prefix``."""
        raise NotImplementedError

    @staticmethod
    def _pack_key(merkle_root: bytes) -> str:
        name = merkle_root.hex()
        return f"packs/{name[:2]}/{name}"

    @staticmethod
    def _header_key(envelope_id: str) -> str:
        return f"envelopes/{_check_id(envelope_id)}.cbor"

    def has(self, envelope_id: str) -> bool:
        return self._exists(self._header_key(envelope_id))

    def put(self, envelope: Envelope) -> bool:
        """Store; True if it was new, False if it was already there."""
        header_key = self._header_key(envelope.envelope_id)
        if self._exists(header_key):
            return False
        try:
            pack = self._pack_key(envelope.header.merkle_root)
            if not self._exists(pack):
                self._write(pack, b"".join(envelope.bodies))
            record = {"header": envelope.header.to_wire(), "signature": envelope.signature}
            self._write(header_key, canonical_bytes(record))
        except OSError as exc:
            raise ObjectStoreError(f"envelope {envelope.envelope_id}: write failed: {exc.strerror or exc}") from None
        return True

    def withdraw(self, envelope_id: str) -> None:
        """Make a stored envelope not exist (its pack becomes garbage): for a store whose
        registration the ledger then refused, so nothing is left stored half-way."""
        self._delete(self._header_key(envelope_id))

    def get(self, envelope_id: str) -> Envelope:
        try:
            record = decode(self._read(self._header_key(envelope_id)))
        except ObjectMissing:
            raise ObjectMissing(f"envelope {envelope_id} is not stored") from None
        header = EnvelopeHeader.from_wire(record["header"])
        if header.envelope_id != envelope_id:  # a swapped or misfiled header: never hand it out
            raise ObjectMismatch(f"envelope {envelope_id}: the store holds envelope "
                                 f"{header.envelope_id} under its name, not the one asked for")
        try:
            pack = memoryview(self._read(self._pack_key(header.merkle_root)))
        except ObjectMissing:
            raise ObjectMissing(f"envelope {envelope_id}: its ciphertext is missing") from None
        if len(pack) != sum(ref.length for ref in header.chunks):
            raise ObjectStoreError(f"envelope {envelope_id}: ciphertext has the wrong size in storage")
        bodies, offset = [], 0
        for i, ref in enumerate(header.chunks):
            body = bytes(pack[offset : offset + ref.length])
            offset += ref.length
            h = hashlib.sha256(ref.nonce)
            h.update(body)
            if h.digest() != ref.digest:
                raise ObjectStoreError(f"envelope {envelope_id}: chunk {i} is corrupt in storage")
            bodies.append(body)
        return Envelope(header, record["signature"], tuple(bodies))

    def ids(self) -> Iterator[str]:
        for key, _ in sorted(self._list("envelopes/")):
            if key.endswith(".cbor"):
                yield key.rsplit("/", 1)[1][: -len(".cbor")]

    def collect_garbage(self, older_than_s: float = 3600.0, now: float | None = None) -> int:
        """Delete packs no stored envelope references (left by a crash mid-put)."""
        now = time.time() if now is None else now
        live = set()
        for envelope_id in self.ids():
            record = decode(self._read(self._header_key(envelope_id)))
            live.add(self._pack_key(record["header"]["merkle_root"]))
        removed = 0
        for key, mtime in list(self._list("packs/")):
            if key not in live and now - mtime > older_than_s:
                self._delete(key)
                removed += 1
        return removed


class LocalObjectStore(ObjectStore):
    """Files under ``root``: ``packs/ab/<merkle root>`` and ``envelopes/<id>.cbor``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "packs").mkdir(parents=True, exist_ok=True)
        (self.root / "envelopes").mkdir(parents=True, exist_ok=True)

    def _exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def _read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def _write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        durable_write(path, data)

    def _delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def _list(self, prefix: str) -> Iterator[tuple[str, float]]:
        base = self.root / prefix
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix(), path.stat().st_mtime


class S3ObjectStore(ObjectStore):
    """An S3-compatible bucket (AWS, MinIO, Ceph RGW...) through boto3; ``prefix`` scopes
    one deployment's keys. Credentials come from boto3's usual chain, never from us."""

    def __init__(self, bucket: str, prefix: str = "", client=None, **client_kwargs):
        if client is None:
            import boto3  # optional dependency: pip install medchain[s3]

            client = boto3.client("s3", **client_kwargs)
        self.bucket, self.prefix, self._s3 = bucket, prefix.strip("/"), client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"s3://{self.bucket}/{self._key(key)}: {exc}") from None

    def _read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                raise ObjectMissing(key) from None
            raise ObjectStoreError(f"s3://{self.bucket}/{self._key(key)}: {exc}") from None

    def _write(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise ObjectStoreError(f"s3://{self.bucket}/{self._key(key)}: {exc}") from None

    def _delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _list(self, prefix: str) -> Iterator[tuple[str, float]]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix)
        ):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:], obj["LastModified"].timestamp()


def open_store(url: str) -> ObjectStore:
    """``file:///path`` (or a plain path) or ``s3://bucket/prefix``."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3ObjectStore(bucket, prefix, endpoint_url=os.environ.get("MEDCHAIN_S3_ENDPOINT"))
    return LocalObjectStore(url[len("file://"):] if url.startswith("file://") else url)
