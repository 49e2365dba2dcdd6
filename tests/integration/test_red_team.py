"""Attacks on a real server on the digits model: clients that never read their streams, a stream hang-up, a
progressive-JPEG scan bomb, a picture one pixel wide, uploads beyond the body budget, image URLs across API keys,
a forged X-Forwarded-Host, and racing image-URL clients on a small store. Through each the server stays healthy
and answers what it should, and its log holds no traceback."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.helpers import ServerHandle, start_server

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
KEY_A, KEY_B = "sk-red-team-key-a-0001", "sk-red-team-key-b-0002"
MAX_CONNECTIONS = 8
SEND_TIMEOUT = 1.0
STORE_BYTES = 96 * 1024  # room for about two answers of three 64x64 PNGs
MAX_UPLOAD = 3 << 20
BODY_BUDGET = 5 << 20  # two uploads of 2 MiB, not three
MIB = 1 << 20


@contextlib.contextmanager
def red_team_server(tmp: Path, *args: str, **env: str) -> Iterator[ServerHandle]:
    """A server with two API keys whose log must end without a traceback. Settings go as environment variables
    only, so the module runs unchanged against a server that lacks some of them."""
    with start_server(
        list(args),
        MODEL_BATCH="8",
        LOG_FORMAT="text",
        API_KEYS=f"{KEY_A},{KEY_B}",
        IMAGE_STORE_DIR=str(tmp),
        IMAGE_URL_TTL_SECONDS="120",
        **env,
    ) as handle:
        yield handle
        log = handle.log()
        assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with red_team_server(
        tmp_path_factory.mktemp("images"),
        "--max-connections",
        str(MAX_CONNECTIONS),
        SEND_TIMEOUT=str(SEND_TIMEOUT),
        MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        MAX_BODY_MEMORY_BYTES=str(BODY_BUDGET),
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Room for a dozen small images; connections enough for 16 clients at once."""
    with red_team_server(
        tmp_path_factory.mktemp("small-store"), IMAGE_STORE_MAX_BYTES=str(STORE_BYTES)
    ) as handle:
        yield handle


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_process(server: ServerHandle) -> psutil.Process:
    assert server.process is not None
    return psutil.Process(server.process.pid)


def metric(server: ServerHandle, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=auth(), timeout=5).text
    total = 0.0
    for match in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def access_statuses(server: ServerHandle, request_id: str) -> list[str]:
    return re.findall(rf"request_id={re.escape(request_id)} .*?status=(\d+)", server.log())


def raw_request(path: str, body: bytes, headers: dict[str, str], length: int | None = None) -> bytes:
    """A POST's bytes; `length` declares a longer body than `body`, the part sent so far."""
    declared = len(body) if length is None else length
    lines = [f"POST {path} HTTP/1.1", "Host: red-team", f"Content-Length: {declared}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def connect(server: ServerHandle, receive_buffer: int | None = None) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
        )  # before connect: sets the window
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


def server_port(server: ServerHandle) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def server_peers(server: ServerHandle) -> set[int]:
    """The client ports of the connections the API process holds open."""
    held = api_process(server).net_connections("tcp")
    return {conn.raddr.port for conn in held if conn.raddr and conn.laddr.port == server_port(server)}


def send_queues(server: ServerHandle) -> dict[int, int]:
    """By client port, the bytes the kernel holds for the server's side of each connection, sent or not:
    /proc/net/tcp's tx_queue. It changes while the server writes or the client takes bytes; a stalled
    connection's stays put."""
    queues = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queue = fields[1], fields[2], fields[4]
        if int(local.rsplit(":", 1)[1], 16) == server_port(server):
            queues[int(remote.rsplit(":", 1)[1], 16)] = int(queue.split(":")[0], 16)
    return queues


def test_clients_that_never_read_are_cut_off_and_probes_still_answer(server: ServerHandle) -> None:
    """8 streams (as many as --max-connections) whose clients never read: /health/ready answers 200 within
    1 s all along, and each connection is closed within SEND_TIMEOUT + 2 s of its last progress (the server
    writing to it or its client taking bytes); the metrics and the access log count each 499."""
    before_499 = metric(server, "diffuserve_requests_total", status="499")
    body = json.dumps(
        {"prompt": "the digit 3", "stream": True, "partial_images": 3, "n": 2, "size": "256x256"}
        | {"output_format": "png"}
    ).encode()
    readers = []
    for index in range(MAX_CONNECTIONS):
        sock = connect(server, receive_buffer=4096)
        headers = {**auth(), "Content-Type": "application/json", "X-Request-Id": f"never-reads-{index}"}
        sock.sendall(raw_request(GENERATIONS, body, headers))
        readers.append(sock)
    ports = [sock.getsockname()[1] for sock in readers]
    last_progress = dict.fromkeys(ports, time.monotonic())
    queued = dict.fromkeys(ports, 0)
    closed: dict[int, float] = {}
    probes: list[tuple[int, float]] = []
    deadline = time.monotonic() + 60
    try:
        while len(closed) < len(ports) and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = httpx.get(f"{server.base_url}/health/ready", timeout=1.0).status_code
            except httpx.HTTPError:
                status = 0
            probes.append((status, time.monotonic() - started))
            assert status == 200 and probes[-1][1] < 1.0, probes
            held, queues = server_peers(server), send_queues(server)
            now = time.monotonic()
            for port in ports:
                if port in closed:
                    continue
                if port not in held:
                    closed[port] = now
                elif queues.get(port, 0) != queued[port]:
                    queued[port], last_progress[port] = queues.get(port, 0), now
            time.sleep(0.2)
    finally:
        for sock in readers:
            sock.close()
    assert len(closed) == len(ports), f"{len(ports) - len(closed)} connection(s) still open after 60 s"
    late = {port: closed[port] - last_progress[port] for port in ports}
    assert max(late.values()) <= SEND_TIMEOUT + 2, late
    assert metric(server, "diffuserve_send_timeouts_total") >= len(ports)
    deadline = time.monotonic() + 10
    while metric(server, "diffuserve_requests_total", status="499") < before_499 + len(ports):
        assert time.monotonic() < deadline, "the cut-off streams were not counted 499"
        time.sleep(0.2)
    for index in range(MAX_CONNECTIONS):
        assert access_statuses(server, f"never-reads-{index}") == ["499"]


def test_a_stream_left_midway_is_499_in_the_log_and_the_metrics(server: ServerHandle) -> None:
    before = metric(server, "diffuserve_requests_total", status="499")
    # Long enough (four 256x256 images) to be left midway.
    body = json.dumps(
        {"prompt": "the digit 7", "stream": True, "partial_images": 3, "n": 4, "size": "256x256"}
    ).encode()
    headers = {**auth(), "Content-Type": "application/json", "X-Request-Id": "leaves-midway"}
    with connect(server) as sock:
        sock.sendall(raw_request(GENERATIONS, body, headers))
        assert b"200 OK" in sock.recv(65536)
    deadline = time.monotonic() + 15
    while not access_statuses(server, "leaves-midway"):
        assert time.monotonic() < deadline, "the stream's request was never logged"
        time.sleep(0.1)
    assert access_statuses(server, "leaves-midway") == ["499"]
    assert metric(server, "diffuserve_requests_total", status="499") == before + 1


def scan_bomb(size: int) -> bytes:
    """A 4096x4096 progressive JPEG whose last scan (an AC refinement a few bytes long, yet a pass over every
    block) is repeated until the file is `size` bytes: libjpeg warns of the bogus progression and decodes each."""
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096), 128).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    ends, at = [], 2  # where each scan's entropy-coded data ends
    while data[at + 1] != 0xD9:
        marker = data[at + 1]
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA:
            at = data.find(b"\xff", at)
            while data[at + 1] == 0 or 0xD0 <= data[at + 1] <= 0xD7:  # stuffed bytes and restart markers
                at = data.find(b"\xff", at + 2)
            ends.append(at)
    last = data[ends[-2] : ends[-1]]  # the last scan, with the table segments before it
    repeats = (size - len(data)) // len(last)
    return data[: ends[-1]] + last * repeats + data[ends[-1] :]


def edit_form(image: bytes, filename: str, media_type: str) -> dict[str, tuple[str, bytes, str]]:
    return {"image": (filename, image, media_type)}


def test_a_progressive_jpeg_scan_bomb_is_refused_within_2_s_of_cpu(server: ServerHandle) -> None:
    bomb = scan_bomb(MIB)
    assert len(bomb) <= MIB
    api = api_process(server)
    cpu_before, started = sum(api.cpu_times()[:2]), time.monotonic()
    response = httpx.post(
        f"{server.base_url}{EDITS}",
        headers=auth(),
        data={"prompt": "the digit 1"},
        files=edit_form(bomb, "bomb.jpg", "image/jpeg"),
        timeout=20,
    )
    took, cpu = time.monotonic() - started, sum(api.cpu_times()[:2]) - cpu_before
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "scans" in error["message"]
    assert cpu <= 2.0 and took <= 5.0, (cpu, took)
    assert httpx.get(f"{server.base_url}/health/live", timeout=1).status_code == 200


def peak_rss_during(process: psutil.Process, action: Callable[[], None]) -> int:
    """How far the process's resident memory rose above its start while `action` ran: the kernel's high-water
    mark, reset first (clear_refs 5)."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    start = process.memory_info().rss
    action()
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak_kib = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    return peak_kib * 1024 - start


def test_a_picture_one_pixel_wide_costs_the_api_under_100_mib(server: ServerHandle) -> None:
    buffer = io.BytesIO()
    Image.new("L", (1, 16_777_216), 200).save(buffer, "PNG", optimize=True)
    thin = buffer.getvalue()
    responses: list[httpx.Response] = []

    def send() -> None:
        responses.append(
            httpx.post(
                f"{server.base_url}{EDITS}",
                headers=auth(),
                data={"prompt": "the digit 1"},
                files=edit_form(thin, "thin.png", "image/png"),
                timeout=60,
            )
        )

    grew = peak_rss_during(api_process(server), send)
    assert grew <= 100 * MIB, f"the API grew {grew / MIB:.0f} MiB"
    assert responses[0].status_code == 400, responses[0].text
    assert responses[0].json()["error"]["param"] == "image"


def test_uploads_beyond_the_body_budget_wait_their_turn(server: ServerHandle) -> None:
    """Two uploads declaring 2 MiB each hold 4 of the 5 MiB budget while they trickle in: a third gets 429
    with Retry-After, the server stays live, and once they are gone the same upload is taken."""
    head = {**auth(), "Content-Type": "multipart/form-data; boundary=xyz"}
    declared = 2 * MIB
    held = []
    for _ in range(2):
        sock = connect(server)
        sock.sendall(raw_request(EDITS, b"--xyz\r\n", head, length=declared))
        held.append(sock)
    time.sleep(0.5)
    body = b"--xyz\r\n" + b"x" * (declared - 20)
    try:
        third = httpx.post(f"{server.base_url}{EDITS}", headers=head, content=body, timeout=30)
        assert third.status_code == 429, third.text
        assert third.headers["retry-after"] == "1" and third.json()["error"]["code"] == "body_memory_full"
        started = time.monotonic()
        assert httpx.get(f"{server.base_url}/health/live", timeout=1).status_code == 200
        assert time.monotonic() - started < 1
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while (
        later := httpx.post(f"{server.base_url}{EDITS}", headers=head, content=body, timeout=30)
    ).status_code == 429:
        assert time.monotonic() < deadline, "the budget was not given back"
        time.sleep(0.2)
    assert later.status_code == 400, later.text  # taken and read: a malformed form, not a full budget


def url_answer(
    server: ServerHandle, key: str, client: httpx.Client | None = None, **extra: str
) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(
        f"{server.base_url}{GENERATIONS}",
        headers={**auth(key), **extra},
        json={"prompt": "the digit 5", "response_format": "url", "n": 1},
        timeout=60,
    )


def test_an_image_url_answers_only_to_the_key_that_made_it(server: ServerHandle) -> None:
    response = url_answer(server, KEY_A)
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    other = httpx.get(url, headers=auth(KEY_B), timeout=10)
    assert other.status_code == 404 and other.json()["error"]["code"] == "image_not_found"
    assert httpx.get(url, headers=auth(KEY_A), timeout=10).status_code == 200


def test_a_forged_forwarded_host_does_not_reach_the_url(server: ServerHandle) -> None:
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    # From 127.0.0.2, an address not in FORWARDED_ALLOW_IPS (default: the front on 127.0.0.1).
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as outsider:
        response = url_answer(server, KEY_A, outsider, **forged)
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"].startswith(f"{server.base_url}/v1/images/")
    # The front itself, on 127.0.0.1, is believed.
    trusted = url_answer(server, KEY_A, **forged)
    assert trusted.status_code == 200, trusted.text
    assert trusted.json()["data"][0]["url"].startswith("https://evil.example/v1/images/")


def test_racing_url_clients_never_see_a_fresh_url_404(small_store: ServerHandle) -> None:
    """16 clients ask for three images each as URLs at once, on a store that holds a few: each answer is either
    three URLs that all download, or a 507 that says the store is full; never a 404."""

    def one(index: int) -> list[int] | str:
        response = httpx.post(
            f"{small_store.base_url}{GENERATIONS}",
            headers=auth(KEY_A if index % 2 else KEY_B),
            json={"prompt": f"the digit {index % 10}", "response_format": "url", "n": 3}
            | {"size": "64x64", "output_format": "png"},
            timeout=60,
        )
        if response.status_code == 507:
            error = response.json()["error"]
            assert error["code"] == "image_store_full" and "b64_json" in error["message"], error
            return "refused"
        assert response.status_code == 200, response.text
        key = KEY_A if index % 2 else KEY_B
        return [
            httpx.get(item["url"], headers=auth(key), timeout=10).status_code
            for item in response.json()["data"]
        ]

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(16)))
    fetched = Counter(status for outcome in outcomes if outcome != "refused" for status in outcome)
    refused = outcomes.count("refused")
    assert set(fetched) == {200} and fetched[200] == 3 * (16 - refused), (fetched, refused)
    assert 0 < refused < 16, "the bound should have let some answers in and refused others"
