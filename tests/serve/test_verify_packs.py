"""`duphunter verify` proves layers from their packs alone, on a stack of its own: a layer
whose pack is gone is found broken while the layer buffer still serves it, a flipped byte
in a pack is named as damage to its file, and only a clean run exits 0. Each test puts
back what it broke, so the others find a healthy store."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from deploy.stack import VENV_BIN, wait_until
from pipelines.serve.layercheck import check_from_packs
from tests.client import RegistryClient, sha256
from tests.conftest import LiveStack, own_live_stack
from tests.layers import KiB, deduplicated_layer, get, layer_of, random_files
from tests.storage import files_by_pack, hexes, pack_changed

CONFIG = b'{"architecture":"amd64","os":"linux"}'  # what push_image pushes as the config


@pytest.fixture(scope="module")
def verify_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("verify-stack")
    with own_live_stack(workdir, {"DUPHUNTER_PREDICTOR": "none"}) as live:
        yield live


def lost_with(pack: str, files: dict[str, bytes]) -> set[str]:
    """What verification says of each of these files when their pack is gone."""
    return {
        f"file {sha256(content)} ({path}) in pack {pack} missing: the pack is gone"
        for path, content in files.items()
    }


def buffered(live: LiveStack, client: RegistryClient, repo: str, digest: str) -> None:
    """GET the layer (a restore, which fills the buffer) until the buffer holds all of it."""
    assert get(client, repo, digest)[0] == "restore"
    entry_complete = lambda: (e := live.registry.buffer.entry(digest)) is not None and e.complete  # noqa: E731
    wait_until(entry_complete, "the buffer entry")


def verify(live: LiveStack, *args: str, json_out: bool = True) -> tuple[int, Any, str]:
    """`duphunter verify ARGS`: its exit code, its output (parsed with --json), stderr."""
    command = [str(VENV_BIN / "duphunter"), "--url", live.url, "verify", *args]
    done = subprocess.run(
        command + (["--json"] if json_out else []), capture_output=True, text=True, timeout=600
    )
    return done.returncode, json.loads(done.stdout) if json_out else done.stdout, done.stderr


def test_a_lost_pack_is_found_while_the_buffer_still_serves_the_layer(
    verify_live: LiveStack,
) -> None:
    live, client = verify_live, RegistryClient(verify_live.url)
    shared = random_files("lib", 5)
    base = deduplicated_layer(client, "verify/base", live, layer_of(shared))
    own = random_files("app", 4)
    app_layer = layer_of({**shared, **own})
    app = deduplicated_layer(client, "verify/app", live, app_layer)
    buffered(live, client, "verify/app", app)
    (own_pack,) = [pack for pack, held in files_by_pack(live, app).items() if held == hexes(own)]
    with pack_changed(live, own_pack, None):
        assert get(client, "verify/app", app) == ("buffer", app_layer)  # the cache hides it
        code, status, progress = verify(live, "--all")
        assert code == 1 and status["state"] == "success"
        assert status["layers"][app].startswith("FAILED")
        assert status["layers"][base] == status["layers"][sha256(CONFIG)] == "verified"
        broken = status["broken"][app]
        expected = lost_with(own_pack, own)
        assert set(broken["problems"]) == expected and len(broken["problems"]) == len(own)
        assert "does not restore from its packs" in broken["reason"]
        counted = f"{len(own)} of {len(shared) + len(own)} files missing or damaged"
        assert counted in broken["reason"]
        assert list(status["broken"]) == [app]
        assert f"] {len(status['layers'])}/{len(status['layers'])}" in progress  # the bar
        assert live.registry.index.layer(app)["verify_error"] == broken["reason"]
        assert get(client, "verify/app", app) == ("buffer", app_layer)  # still served
    assert verify(live, "--all")[0] == 0  # the pack is back


def test_a_flipped_byte_in_a_pack_is_damage_to_its_file(verify_live: LiveStack) -> None:
    """Verification and a GET both name what the recovery needs: the layer, the damaged
    file by the sha256 it must have and its path in the layer, and its pack (the long
    path is one a PAX record holds)."""
    live, client = verify_live, RegistryClient(verify_live.url)
    files = random_files("flip", 4) | {"flip/" + "deep/" * 30 + "long": os.urandom(20 * KiB)}
    digest = deduplicated_layer(client, "verify/flipped", live, layer_of(files))
    ((pack, held),) = files_by_pack(live, digest).items()
    for victim in (sorted(held)[2], sha256(files["flip/" + "deep/" * 30 + "long"])[7:]):
        (path,) = [name for name, content in files.items() if sha256(content)[7:] == victim]
        flipped_in_pack(live, client, digest, pack, victim, path)


def flipped_in_pack(
    live: LiveStack, client: RegistryClient, digest: str, pack: str, victim: str, path: str
) -> None:
    (location,) = live.registry.files.locate([bytes.fromhex(victim)])
    assert location is not None
    damaged = bytearray(live.registry.store.get_bytes(pack))
    damaged[location.offset + location.length // 2] ^= 0x01
    named = f"file sha256:{victim} ({path}) in pack {pack}"
    with pack_changed(live, pack, bytes(damaged)):
        code, status, _progress = verify(live, "--all")
        assert code == 1
        (problem,) = status["broken"][digest]["problems"]
        assert problem.startswith(f"{named} damaged: read back as 20480 bytes hashing to "), problem
        assert problem.endswith(f"(expected 20480 bytes hashing to sha256:{victim})"), problem
        reason = status["broken"][digest]["reason"]
        assert "1 of 5 files missing or damaged" in reason and named in reason, reason
        code, shown, _progress = verify(live, "--all", json_out=False)
        assert code == 1 and f"{digest}  BROKEN: " in shown and problem in shown
        served = client.request("GET", f"/v2/verify/flipped/blobs/{digest}")
        assert served.status == 500  # one 4 MiB segment: no byte of it was verified
        message = json.loads(served.data)["errors"][0]["message"]
        assert f"layer {digest}: {named} read back as" in message, message


def test_a_healthy_store_verifies_and_exits_zero(verify_live: LiveStack) -> None:
    live, client = verify_live, RegistryClient(verify_live.url)
    digest = deduplicated_layer(client, "verify/healthy", live, layer_of(random_files("ok", 3)))
    code, status, _progress = verify(live, "--all")
    assert code == 0 and status["state"] == "success" and status["broken"] == {}
    assert status["layers"][digest] == status["layers"][sha256(CONFIG)] == "verified"
    record = live.registry.index.layer(digest)
    assert record["verify_error"] == "" and float(record["verified"]) > 0
    code, status, _progress = verify(live, "--sample", "1")
    assert code == 0 and list(status["layers"].values()) == ["verified"]


def test_check_from_packs_ignores_the_buffer(verify_live: LiveStack) -> None:
    live, client = verify_live, RegistryClient(verify_live.url)
    files = random_files("direct", 3)
    digest = deduplicated_layer(client, "verify/direct", live, layer_of(files))
    buffered(live, client, "verify/direct", digest)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None
    ((pack, _held),) = files_by_pack(live, digest).items()
    with pack_changed(live, pack, None):
        check = check_from_packs(live.registry.store, live.registry.files, info)
        assert not check.ok and check.digest == digest
        assert set(check.problems) == lost_with(pack, files) and len(check.problems) == len(files)
        assert "3 of 3 files missing or damaged" in check.reason
        assert check.as_dict() == {"digest": digest, "ok": False, "reason": check.reason,
                                   "problems": check.problems}  # fmt: skip
        verified = live.registry.verify_blob(digest)  # what the verify job runs
        assert (verified["ok"], verified["problems"]) == (False, check.problems)
        assert live.registry.index.layer(digest)["verify_error"] == check.reason
        entry = live.registry.buffer.entry(digest)
        assert entry is not None and entry.complete
    assert check_from_packs(live.registry.store, live.registry.files, info).as_dict() == {
        "digest": digest, "ok": True, "reason": "", "problems": []}  # fmt: skip


def test_check_from_packs_reads_an_intact_blob_from_its_data_objects(
    verify_live: LiveStack,
) -> None:
    live, client = verify_live, RegistryClient(verify_live.url)
    blob = os.urandom(100 * KiB)
    digest = client.push_blob_chunked("verify/intact", blob, 40 * KiB)
    info = live.registry.blobs.stored_info(digest)
    assert info is not None and len(info.segments) == 3

    def check() -> tuple[bool, str, list[str]]:
        result = check_from_packs(live.registry.store, live.registry.files, info)
        return result.ok, result.reason, result.problems

    assert check() == (True, "", [])
    store, middle = live.registry.store, info.segments[1].key
    original = store.get_bytes(middle)
    try:
        store.put_bytes(middle, original[:-1] + bytes([original[-1] ^ 1]))
        ok, reason, _problems = check()
        assert not ok and reason.startswith("its data objects read back as sha256:")
        store.delete([middle])
        assert check() == (False, "1 of 3 data objects missing or damaged",
                           [f"data object {middle} missing"])  # fmt: skip
    finally:
        store.put_bytes(middle, original)
