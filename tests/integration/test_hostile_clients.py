"""Hostile and broken clients on raw sockets against a real server (what uvicorn's HTTP parser and our protocol
class see): upload hang-ups, malformed bodies, slow headers and bodies, too many connections, forged log lines
in the server's and its workers' log. Every answer a client sees is the status the metrics count, and nothing a
client does puts a traceback in the log."""

from __future__ import annotations

import json
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from diffuserve.api.http_protocol import PROBE_CONNECTIONS
from tests.helpers import ServerHandle, start_server

URL = "/v1/images/generations"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[ServerHandle]:
    with start_server(
        [
            "--header-timeout",
            str(HEADER_TIMEOUT),
            "--body-timeout",
            str(BODY_TIMEOUT),
            "--max-connections",
            str(MAX_CONNECTIONS),
        ],
        MODEL_BATCH="4",
        LOG_FORMAT="text",
    ) as handle:
        yield handle


def connect(server: ServerHandle) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data, time.monotonic() - started


def post_head(length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST {URL} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
        f"{size}{extra}\r\n"
    ).encode()


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def requests_by_status(server: ServerHandle) -> Counter[str]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    counts: Counter[str] = Counter()
    for match in re.finditer(r'^diffuserve_requests_total\{[^}]*status="(\d+)"\} (\S+)$', text, re.M):
        counts[match.group(1)] += int(float(match.group(2)))
    return counts


def assert_no_traceback(server: ServerHandle) -> None:
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def test_upload_hangups_are_499_and_metrics_match_what_clients_saw(hostile_server: ServerHandle) -> None:
    """200 requests, 20 % of them hanging up halfway through their body: no 500, and the counter by status
    equals what the clients saw (a hang-up's client sees nothing; the server counts it 499)."""
    before = requests_by_status(hostile_server)
    body = json.dumps({"prompt": "the digit 4", "seed": 5, "response_format": "b64_json"}).encode()

    def one(index: int) -> str:
        if index % 5 == 0:
            with connect(hostile_server) as sock:
                sock.sendall(post_head(len(body)) + body[: len(body) // 2])
                time.sleep(0.02)
            return "499"
        response = httpx.post(
            f"{hostile_server.base_url}{URL}", content=body, headers=_json_headers(), timeout=60
        )
        return str(response.status_code)

    with ThreadPoolExecutor(8) as pool:
        seen = Counter(pool.map(one, range(200)))
    assert seen == {"200": 160, "499": 40}, seen
    expected = before + seen
    deadline = time.monotonic() + 10
    while requests_by_status(hostile_server) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests_by_status(hostile_server) == expected
    assert_no_traceback(hostile_server)


def _json_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "Accept": "application/json"}


def test_malformed_chunked_body_is_400_in_the_envelope_and_counted(hostile_server: ServerHandle) -> None:
    before = requests_by_status(hostile_server)
    with connect(hostile_server) as sock:
        sock.sendall(post_head(None) + b'5\r\n{"pro\r\nZZ-not-hex\r\n')
        raw, _ = read_all(sock, 5)
    status, body = status_and_body(raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    deadline = time.monotonic() + 5
    while requests_by_status(hostile_server)["400"] == before["400"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_by_status(hostile_server)["400"] == before["400"] + 1
    assert_no_traceback(hostile_server)


def test_half_a_body_is_cut_off_at_the_body_deadline(hostile_server: ServerHandle) -> None:
    with connect(hostile_server) as sock:
        sock.sendall(post_head(200) + b'{"prompt": "slow')
        raw, took = read_all(sock, BODY_TIMEOUT + 5)
    status, body = status_and_body(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT - 0.2 <= took <= BODY_TIMEOUT + 1.5, took
    assert_no_traceback(hostile_server)


@pytest.mark.parametrize("partial", [b"", b"POST /v1/images/gener", b"POST / HTTP/1.1\r\nHost: x\r\nAcc"])
def test_half_sent_headers_are_cut_off_at_the_header_deadline(
    hostile_server: ServerHandle, partial: bytes
) -> None:
    with connect(hostile_server) as sock:
        sock.sendall(partial)
        raw, took = read_all(sock, HEADER_TIMEOUT + 5)
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + 1.5, took
    status, body = status_and_body(raw)
    assert status == 408 and body["error"]["code"] == "request_timeout"


def test_connections_beyond_the_cap_get_503_and_are_closed(hostile_server: ServerHandle) -> None:
    """Beyond the cap, PROBE_CONNECTIONS more connections serve health probes only (anything else is 503,
    and each closes after its answer); past those a new connection is answered 503 at once and closed."""
    held = [connect(hostile_server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with connect(hostile_server) as probe:
            probe.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
            raw, took = read_all(probe, 3)
        status, body = status_and_body(raw)
        assert status == 200 and body == {"status": "alive"} and took < 1
        with connect(hostile_server) as other:
            other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")
            raw, took = read_all(other, 3)
        status, body = status_and_body(raw)
        assert status == 503 and body["error"]["code"] == "too_many_connections" and took < 1
        held += [connect(hostile_server) for _ in range(PROBE_CONNECTIONS)]
        time.sleep(0.2)
        with connect(hostile_server) as extra:
            raw, took = read_all(extra, 3)
        status, body = status_and_body(raw)
        assert status == 503 and body["error"]["code"] == "too_many_connections" and took < 1
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{hostile_server.base_url}/health/live", timeout=5).status_code == 200


def test_a_forged_newline_in_a_field_name_is_escaped_in_the_log(hostile_server: ServerHandle) -> None:
    forged = "a\n2026-01-01 00:00:00 ERROR [server] forged"
    names = {forged: 1, **{f"junk{i}" + "z" * 300: i for i in range(500)}}
    # A prompt longer than the text encoders take: the library's truncation warning would quote its tail.
    prompt = "the digit 2 " + "seven " * 100 + "\n2026-01-01 00:00:00 ERROR [server] forged in a prompt"
    response = httpx.post(f"{hostile_server.base_url}{URL}", json={"prompt": prompt, **names}, timeout=30)
    assert response.status_code == 200
    log = hostile_server.log()
    assert "a\\n2026-01-01 00:00:00 ERROR [server] forged" in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    line = next(line for line in log.splitlines() if "ERROR [server] forged" in line)
    assert "ignoring 501 unknown request field(s)" in line and len(line) < 2000


def test_405_carries_allow_and_protocol_errors_are_json(hostile_server: ServerHandle) -> None:
    response = httpx.put(f"{hostile_server.base_url}{URL}", json={}, timeout=5)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"
    with connect(hostile_server) as sock:
        sock.sendall(b"GARBAGE\x01 / HTTP/9\r\n\r\n")
        raw, _ = read_all(sock, 5)
    status, body = status_and_body(raw)
    assert status == 400 and body["error"]["code"] == "invalid_http_request"
