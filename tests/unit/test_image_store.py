"""The image store behind response_format "url": ids, atomic files, expiry, the byte bound, restarts."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from diffuserve.api.image_store import ID_PATTERN, STALE_TEMP_SECONDS, TEMP_PREFIX, ImageStore, valid_id
from diffuserve.types import EncodedImage


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def image(size: int, media_type: str = "image/png", seed: int = 0) -> EncodedImage:
    return EncodedImage(data=bytes([seed % 256]) * size, seed=seed, media_type=media_type)


def store_at(root: Path, clock: Clock, max_bytes: int = 1 << 20, ttl: float = 60.0) -> ImageStore:
    return ImageStore(root, max_bytes=max_bytes, ttl_seconds=ttl, clock=clock)


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
    assert store.total_bytes == 35


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
    store.put_sync([image(1)])
    assert not list(tmp_path.glob(f"{second}.*"))
    assert len(store) == 1 and store.total_bytes == 1


def test_sweep_deletes_every_expired_image(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, ttl=10)
    store.put_sync([image(4), image(4)])
    clock.now += 5
    store.put_sync([image(4)])
    clock.now += 6
    assert store.sweep() == 2
    assert len(list(tmp_path.iterdir())) == 1 and store.total_bytes == 4


def test_byte_bound_evicts_oldest_first(tmp_path: Path) -> None:
    clock = Clock()
    store = store_at(tmp_path, clock, max_bytes=100)
    ids = []
    for seed in range(5):
        clock.now += 1
        ids += store.put_sync([image(30, seed=seed)])
    # 150 bytes put, 100 allowed: the two oldest went, the three newest stayed.
    assert [store.get_sync(i) is not None for i in ids] == [False, False, True, True, True]
    assert store.total_bytes == 90
    assert len(list(tmp_path.iterdir())) == 3


def test_an_answer_larger_than_the_bound_is_kept_whole_until_the_next_put(tmp_path: Path) -> None:
    store = store_at(tmp_path, Clock(), max_bytes=50)
    old = store.put_sync([image(10)])
    big = store.put_sync([image(40), image(40)])
    # Its fresh URLs all work; everything older made room first.
    assert store.get_sync(old[0]) is None
    assert all(store.get_sync(i) is not None for i in big)
    later = store.put_sync([image(10)])
    assert [store.get_sync(i) is not None for i in [*big, *later]] == [False, True, True]


def test_a_restart_counts_and_expires_the_files_already_there(tmp_path: Path) -> None:
    clock = Clock()
    first_run = store_at(tmp_path, clock, max_bytes=100, ttl=60)
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
    second_run = store_at(tmp_path, clock, max_bytes=100, ttl=60)
    assert second_run.get_sync(old[0]) is None
    got = second_run.get_sync(recent[0])
    assert got is not None and got.data == b"\x00" * 30 and got.expires_in == pytest.approx(30)
    assert second_run.total_bytes == 60
    assert not stale_temp.exists() and fresh_temp.exists()
    assert (tmp_path / "notes.txt").exists()  # files not named like the store's are left alone
    # The restored files count toward the bound: 60 + 60 > 100 evicts the older restored one.
    new = second_run.put_sync([image(30), image(30)])
    assert [second_run.get_sync(i) is not None for i in [*recent, *new]] == [False, True, True, True]


def test_a_restart_with_a_smaller_bound_evicts_at_once(tmp_path: Path) -> None:
    clock = Clock()
    ids = []
    for _ in range(3):
        clock.now += 1
        ids += store_at(tmp_path, clock).put_sync([image(40)])
    smaller = store_at(tmp_path, clock, max_bytes=50)
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
