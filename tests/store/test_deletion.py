"""The deletion protocol's notices and leases (pipelines.store.deletion) on a real S3: what a
relier reads, when a run's notices stop counting, and that a run stops deleting before
its lease runs out."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from pipelines.config import Settings
from pipelines.store.deletion import (
    CLOCK_MARGIN_SECONDS,
    LEASE_PREFIX,
    NOTICE_PREFIX,
    Notice,
    NoticeError,
    Notices,
    RunLease,
)
from pipelines.store.storage import ObjectStore, S3Store
from tests.conftest import LiveStack

FILE = hashlib.sha256(b"a file").digest()
BLOB = "sha256:" + hashlib.sha256(b"a blob").hexdigest()


@pytest.fixture
def store(live: LiveStack) -> Iterator[ObjectStore]:
    store = live.registry.store
    yield store
    store.delete([key for prefix in (NOTICE_PREFIX, LEASE_PREFIX)
                  for key, _size in store.list(prefix)])  # fmt: skip


def test_a_notice_reads_back_as_written_and_refuses_another_format() -> None:
    notice = Notice("run-1", frozenset({BLOB}), frozenset({"sha256:" + "b" * 64}),
                    frozenset({FILE, bytes(32)}))  # fmt: skip
    assert Notice.decode(notice.encode()) == notice
    with pytest.raises(NoticeError):
        Notice.decode(b"DHN\x02" + notice.encode()[4:])
    with pytest.raises(NoticeError):
        Notice.decode(notice.encode()[:-1])


def test_a_relier_sees_what_a_live_run_deletes_until_it_withdraws(store: ObjectStore) -> None:
    lease = RunLease(store, 60)
    lease.start()
    lease.publish(Notice(lease.run, blobs=frozenset({BLOB})))
    lease.publish(Notice(lease.run, files=frozenset({FILE})))
    notices = Notices(store)
    found = notices.condemned(blobs=[BLOB, "sha256:" + "c" * 64], files=[FILE])
    assert found.blobs == [BLOB] and found.files == [FILE] and not found.manifests
    assert not notices.condemned(manifests=[BLOB])
    lease.withdraw()
    assert not notices.condemned(blobs=[BLOB], files=[FILE])
    lease.end()
    assert not list(store.list(LEASE_PREFIX))


def test_notices_of_a_dead_run_stop_counting_and_are_cleared(store: ObjectStore) -> None:
    dead = f"dead-{uuid.uuid4().hex[:8]}"
    expired = time.time() - CLOCK_MARGIN_SECONDS - 1
    store.put_bytes(LEASE_PREFIX + dead, json.dumps({"expires": expired}).encode())
    store.put_bytes(f"{NOTICE_PREFIX}{dead}/registry-0",
                    Notice(dead, blobs=frozenset({BLOB})).encode())  # fmt: skip
    assert not Notices(store).condemned(blobs=[BLOB])  # the relier checks existence instead
    lease = RunLease(store, 60)
    lease.start()  # clears what dead runs left
    assert [key for key, _s in store.list(NOTICE_PREFIX)] == []
    assert [key for key, _s in store.list(LEASE_PREFIX)] == [LEASE_PREFIX + lease.run]
    lease.end()


def test_a_run_stops_deleting_before_its_lease_runs_out(store: ObjectStore) -> None:
    lease = RunLease(store, CLOCK_MARGIN_SECONDS + 2)
    lease.start()
    assert lease.may_delete()
    time.sleep(2.5)  # within the clock margin of the end: a relier may soon ignore it
    assert not lease.may_delete()
    lease.renew()
    assert lease.may_delete()
    lease.end()


def test_a_relier_asking_about_blobs_does_not_read_the_files_notices(
    store: ObjectStore, live: LiveStack
) -> None:
    lease = RunLease(store, 60)
    lease.start()
    lease.publish(Notice(lease.run, files=frozenset({FILE})))
    counting = _CountingStore(live.settings)
    assert not Notices(counting).condemned(blobs=[BLOB])
    assert counting.reads == []  # a large files notice is read only by ingests
    assert Notices(counting).condemned(files=[FILE]).files == [FILE]
    lease.end()


class _CountingStore(S3Store):
    """The stack's S3, noting the objects read."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.reads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get_bytes(key)
