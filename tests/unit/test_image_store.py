"""The image store behind response_format "url": ids, atomic files, expiry, a bound in disk blocks that refuses
rather than evicts, reservations, owners, restarts."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from diffuserve.api.image_store import (
    ID_PATTERN,
    STALE_TEMP_SECONDS,
    TEMP_PREFIX,
    ImageStore,
    StoreFull,
    valid_id,
)
from diffuserve.types import EncodedImage

OWNER_A, OWNER_B = "0123456789abcdef", "fedcba9876543210"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def image(size: int, media_type: str = "image/png", seed: int = 0) -> EncodedImage:
    return EncodedImage(data=bytes([seed % 256]) * size, seed=seed, media_type=media_type)


def store_at(root: Path, clock: Clock, max_bytes: int = 1 << 20, ttl: float = 60.0) -> ImageStore:
    return ImageStore(root, max_bytes=max_bytes, ttl_seconds=ttl, clock=clock)


def disk(path: Path) -> int:
    """What a file takes on disk, as the store counts it."""
    stat = path.stat()
    return max(stat.st_blocks * 512, stat.st_size)


@pytest.fixture
def block(tmp_path: Path) -> int:
    """The disk bytes of a small file on the file system of the tests' folders (4096 on ext4)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    size = disk(probe)
    probe.unlink()
    return size


def test_put_then_get_keeps_bytes_and_content_type(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock())
    ids = store.put_sync([image(10, "image/png", 1), image(20, "image/webp", 2), image(5, "image/jpeg", 3)])
    assert len(set(ids)) == 3 and all(ID_PATTERN.fullmatch(i) for i in ids)
    got = [store.get_sync(i) for i in ids]
    assert [(g.data, g.media_type) for g in got if g] == [
        (b"\x01" * 10, "image/png"),
        (b"\x02" * 20, "image/webp"),
        (b"\x03" * 5, "image/jpeg"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{ids[0]}.png", f"{ids[1]}.webp", f"{ids[2]}.jpeg"]
    )  # no temp file left behind
    # Disk blocks, not bytes: 35 bytes of images take three blocks.
    assert store.total_bytes == sum(disk(path) for path in tmp_path.iterdir()) >= 35


def test_ids_are_unguessable_tokens(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock())
    ids = store.put_sync([image(1) for _ in range(200)])
    assert len(set(ids)) == 200
    # 32 characters of a 64-letter alphabet: 192 bits, well above 128.
    assert all(len(i) == 32 for i in ids)


@pytest.mark.parametrize(
    "image_id",
    [
        "",
        "../../etc/passwd",
        "..",
        "a" * 31,
        "a" * 33,
        "a" * 10_000,
        "a" * 31 + "/",
        "a" * 31 + ".",
        "a" * 31 + "\x00",
        "a" * 31 + "é",
        "a" * 32 + "\n",
        "/" + "a" * 31,
    ],
)
def test_malformed_ids_never_reach_the_filesystem(tmp_path: Path, image_id: str) -> None:
    root = tmp_path / "store"
    store = store_at(root, Clock())
    assert not valid_id(image_id)
    assert asyncio.run(store.get(image_id)) is None
    assert store.get_sync(image_id) is None
    assert not root.exists()  # not even opened


def test_an_unknown_well_formed_id_is_none(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock())
    store.put_sync([image(3)])
    assert store.get_sync("A" * 32) is None


def test_expired_images_answer_none_and_their_files_go(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, ttl=60)
    [first] = store.put_sync([image(10)])
    clock.now += 30
    [second] = store.put_sync([image(10)])
    got = store.get_sync(first)
    assert got is not None and got.expires_in == pytest.approx(30)
    clock.now += 30  # first is 60 s old: expired; second 30 s
    assert store.get_sync(first) is None
    assert not list(tmp_path.glob(f"{first}.*"))
    assert store.get_sync(second) is not None
    clock.now += 31
    # A put sweeps what expired even if nobody asks for it again.
    [third] = store.put_sync([image(1)])
    assert not list(tmp_path.glob(f"{second}.*"))
    assert len(store) == 1 and store.total_bytes == disk(tmp_path / f"{third}.png")


def test_sweep_deletes_every_expired_image(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, ttl=10)
    store.put_sync([image(4), image(4)])
    clock.now += 5
    store.put_sync([image(4)])
    clock.now += 6
    assert store.sweep() == 2
    [left] = list(tmp_path.iterdir())
    assert store.total_bytes == disk(left)


def test_a_put_that_does_not_fit_is_refused_and_no_promised_image_goes(tmp_path: Path, block: int) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, max_bytes=3 * block, ttl=60)
    kept = store.put_sync([image(30), image(30)])
    with pytest.raises(StoreFull) as refused:
        store.put_sync([image(30), image(30)])
    assert refused.value.needed == 2 * block and refused.value.free == block
    # Nothing of the refused put was written, and every promised image still answers.
    assert len(list(tmp_path.iterdir())) == 2 and all(store.get_sync(i) for i in kept)
    assert store.put_sync([image(30)])  # what fits still goes in
    clock.now += 60  # once the first ones expire, their room is free again
    assert len(store.put_sync([image(30), image(30)])) == 2


def test_an_answer_larger_than_the_bound_is_refused_whole(tmp_path: Path, block: int) -> None:
    store = store_at(tmp_path, Clock(), max_bytes=2 * block)
    old = store.put_sync([image(10)])
    with pytest.raises(StoreFull):
        store.put_sync([image(10), image(10)])
    assert store.get_sync(old[0]) is not None and len(list(tmp_path.iterdir())) == 1


def test_the_bound_counts_disk_blocks_not_bytes(tmp_path: Path, block: int) -> None:
    # Ten 1-byte images are 10 bytes, but ten blocks on disk: a bound of five blocks takes five.
    store = store_at(tmp_path, Clock(), max_bytes=5 * block)
    for _ in range(5):
        store.put_sync([image(1)])
    with pytest.raises(StoreFull):
        store.put_sync([image(1)])
    assert store.total_bytes == 5 * block


def test_a_reservation_holds_room_until_its_images_take_it(tmp_path: Path, block: int) -> None:
    store = store_at(tmp_path, Clock(), max_bytes=4 * block)
    # 32x32 pixels at an uncompressed 3 bytes each (nothing learnt yet): one block per image.
    first = store.reserve_sync(2, 32 * 32, "image/png")
    assert first.size == 2 * block
    second = store.reserve_sync(2, 32 * 32, "image/png")
    with pytest.raises(StoreFull):
        store.reserve_sync(1, 32 * 32, "image/png")  # the room is promised, though no file exists yet
    ids = store.put_sync([image(100), image(100)], reservation=first)
    assert first.size == 0 and len(ids) == 2
    second.release()
    second.release()  # twice is harmless
    assert store.reserve_sync(2, 32 * 32, "image/png").size == 2 * block


def test_a_reserved_put_may_not_take_more_room_than_is_free(tmp_path: Path, block: int) -> None:
    store = store_at(tmp_path, Clock(), max_bytes=2 * block)
    small = store.reserve_sync(1, 10, "image/png")  # one block held
    with pytest.raises(StoreFull):
        store.put_sync([image(10), image(10), image(10)], reservation=small)
    assert small.size == 0 and store.total_bytes == 0 and not list(tmp_path.iterdir())


def test_an_image_answers_only_to_its_owner(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock)
    [mine] = store.put_sync([image(5, seed=7)], owner=OWNER_A)
    [nobodys] = store.put_sync([image(5, seed=8)])
    assert store.get_sync(mine, OWNER_B) is None and store.get_sync(mine) is None
    got = store.get_sync(mine, OWNER_A)
    assert got is not None and got.data == b"\x07" * 5
    assert store.get_sync(nobodys, OWNER_A) is None and store.get_sync(nobodys) is not None
    assert (tmp_path / f"{mine}.{OWNER_A}.png").exists()
    # The owner is in the file's name: a restart keeps it.
    restarted = store_at(tmp_path, clock)
    assert restarted.get_sync(mine, OWNER_B) is None and restarted.get_sync(mine, OWNER_A) is not None
    with pytest.raises(ValueError, match="hexadecimal"):
        store.put_sync([image(1)], owner="../../x")


def test_a_restart_counts_and_expires_the_files_already_there(tmp_path: Path, block: int) -> None:
    clock = Clock()
    first_run = store_at(tmp_path, clock, max_bytes=3 * block, ttl=60)
    old = first_run.put_sync([image(30)])
    clock.now += 40
    recent = first_run.put_sync([image(30)])
    clock.now += 1
    recent += first_run.put_sync([image(30)])
    (tmp_path / "notes.txt").write_text("not an image of the store")
    stale_temp = tmp_path / f"{TEMP_PREFIX}abc"
    stale_temp.write_bytes(b"half an image")
    os.utime(stale_temp, (clock.now - STALE_TEMP_SECONDS - 1,) * 2)
    fresh_temp = tmp_path / f"{TEMP_PREFIX}def"
    fresh_temp.write_bytes(b"being written")
    os.utime(fresh_temp, (clock.now,) * 2)

    clock.now += 29  # `old` is now 70 s old: past its 60 s
    second_run = store_at(tmp_path, clock, max_bytes=3 * block, ttl=60)
    assert second_run.get_sync(old[0]) is None
    got = second_run.get_sync(recent[0])
    assert got is not None and got.data == b"\x00" * 30 and got.expires_in == pytest.approx(30)
    assert second_run.total_bytes == 2 * block
    assert not stale_temp.exists() and fresh_temp.exists()
    assert (tmp_path / "notes.txt").exists()  # files not named like the store's are left alone
    # The restored files count toward the bound: one more block fits, two do not.
    with pytest.raises(StoreFull):
        second_run.put_sync([image(30), image(30)])
    assert second_run.put_sync([image(30)])
    assert all(second_run.get_sync(i) is not None for i in recent)


def test_a_restart_with_a_smaller_bound_deletes_the_oldest_at_once(tmp_path: Path, block: int) -> None:
    clock = Clock()
    ids = []
    for _ in range(3):
        clock.now += 1
        ids += store_at(tmp_path, clock).put_sync([image(40)])
    smaller = store_at(tmp_path, clock, max_bytes=block)
    assert [smaller.get_sync(i) is not None for i in ids] == [False, False, True]


def test_unknown_media_type_is_refused_before_writing(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock())
    with pytest.raises(ValueError, match="image/gif"):
        store.put_sync([image(3), image(3, "image/gif")])
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_at(tmp_path, Clock())
    calls = []

    def failing_replace(src: str, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        os.rename(src, str(dst))

    monkeypatch.setattr("diffuserve.api.image_store.os.replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        store.put_sync([image(3), image(3)])
    assert not list(tmp_path.iterdir()) and len(store) == 0 and store.total_bytes == 0


def test_async_methods_run_off_the_event_loop(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock())
    threads: list[int] = []
    for name in ("put_sync", "get_sync"):
        method = getattr(store, name)

        def recorded(*args: object, _method=method) -> object:
            threads.append(threading.get_ident())
            return _method(*args)

        setattr(store, name, recorded)

    async def roundtrip() -> tuple[bytes | None, int]:
        [image_id] = await store.put([image(7, seed=9)])
        got = await store.get(image_id)
        return (got.data if got else None), threading.get_ident()

    data, loop_thread = asyncio.run(roundtrip())
    assert data == b"\x09" * 7
    assert len(threads) == 2 and loop_thread not in threads


def test_files_are_private_to_the_server_user(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = store_at(root, Clock())
    [image_id] = store.put_sync([image(3)])
    assert (root / f"{image_id}.png").stat().st_mode & 0o077 == 0


def test_the_periodic_sweep_deletes_expired_images_without_any_request(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, ttl=0.05)  # the sweep runs every min(60 s, lifetime)
    store.put_sync([image(5)])
    clock.now += 1

    async def sweep_a_while() -> None:
        task = asyncio.create_task(store.sweep_forever())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(store) == 0:
                break
        task.cancel()

    asyncio.run(sweep_a_while())
    assert len(store) == 0 and not list(tmp_path.iterdir())


def test_reads_and_sweeps_do_not_create_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    store = store_at(root, Clock())
    assert store.get_sync("A" * 32) is None and store.sweep() == 0
    assert not root.exists()
    [image_id] = store.put_sync([image(2)])
    assert store.get_sync(image_id) is not None
