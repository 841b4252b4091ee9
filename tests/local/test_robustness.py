"""Request bodies the service must survive: chunked past the cap, deep JSON, broken chunks."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from healthimaging_df.local import LocalService

CAP = 4096


@pytest.fixture(scope="module")
def small() -> Iterator[LocalService]:
    with LocalService.seeded(image_sets=30, seed=2, max_body_bytes=CAP) as service:
        yield service


def _head(service: LocalService, method: str, path: str, body: bytes, extra: str) -> bytes:
    signed = service.sign(method, f"http://local{path}", body, {"Host": "local"})
    lines = "".join(f"{k}: {v}\r\n" for k, v in signed.items())
    return f"{method} {path} HTTP/1.1\r\n{lines}{extra}\r\n".encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers.get("Content-Length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_a_chunked_body_under_the_cap_is_read_whole(small: LocalService) -> None:
    path = f"/datastore/{small.datastore_id}/searchImageSets?maxResults=2"
    body = b'{"sort": {"sortField": "createdAt", "sortOrder": "ASC"}}'
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        sock.sendall(_head(small, "POST", path, body, "Transfer-Encoding: chunked\r\n"))
        for i in range(0, len(body), 7):
            sock.sendall(_chunk(body[i : i + 7]))
        sock.sendall(b"0\r\n\r\n")
        status, _, answer = _read_response(sock)
    assert status == 200, answer
    assert len(json.loads(answer)["imageSetsMetadataSummaries"]) == 2


def test_a_chunked_body_is_refused_as_it_passes_the_cap(small: LocalService) -> None:
    """The 413 comes while the client is still sending: nothing past the cap is buffered."""
    path = f"/datastore/{small.datastore_id}/searchImageSets"
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        sock.sendall(_head(small, "POST", path, b"{}", "Transfer-Encoding: chunked\r\n"))
        sent = 0
        while sent <= 2 * CAP:  # past the cap, and the body never ends
            try:
                sock.sendall(_chunk(b" " * 1024))
            except (BrokenPipeError, ConnectionResetError):  # the server may stop listening
                break
            sent += 1024
        started = time.monotonic()
        status, headers, answer = _read_response(sock)
        assert time.monotonic() - started < 5
    assert status == 413
    assert headers["x-amzn-ErrorType"] == "ValidationException"
    assert headers["Connection"] == "close"
    assert json.loads(answer) == {"message": f"The request body exceeds {CAP} bytes"}
    assert small.client().list_datastores()["datastoreSummaries"]  # the service goes on


def test_a_malformed_chunk_is_a_400(small: LocalService) -> None:
    path = f"/datastore/{small.datastore_id}/searchImageSets"
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as sock:
        sock.sendall(_head(small, "POST", path, b"{}", "Transfer-Encoding: chunked\r\n"))
        sock.sendall(b"zz\r\n{}\r\n0\r\n\r\n")
        status, headers, _ = _read_response(sock)
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")


def _raw(service: LocalService, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(_head(service, "POST", path, body, f"Content-Length: {len(body)}\r\n") + body)
        return _read_response(sock)


@pytest.mark.parametrize("depth", [65, 5_000, 100_000])
def test_deeply_nested_search_criteria_are_a_validation_error(
    ahi_local: LocalService, depth: int
) -> None:
    body = b'{"filters": ' + b"[" * depth + b"]" * depth + b"}"
    status, headers, answer = _raw(
        ahi_local, f"/datastore/{ahi_local.datastore_id}/searchImageSets", body
    )
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert "deeper than 64" in json.loads(answer)["message"]


def test_nesting_inside_strings_does_not_count(ahi_local: LocalService) -> None:
    body = json.dumps(
        {"filters": [{"values": [{"DICOMPatientId": "[" * 200}], "operator": "EQUAL"}]}
    )
    status, _, answer = _raw(
        ahi_local, f"/datastore/{ahi_local.datastore_id}/searchImageSets", body.encode()
    )
    assert status == 200, answer


def test_deep_update_documents_are_a_validation_error(ahi_local: LocalService) -> None:
    record: dict[str, Any] = ahi_local.backend.image_sets(str(ahi_local.datastore_id))[0]
    deep = b'{"Study": {"DICOM": {"X": ' + b"[" * 10_000 + b"]" * 10_000 + b"}}}"
    body = json.dumps(
        {"DICOMUpdates": {"updatableAttributes": base64.b64encode(deep).decode()}}
    ).encode()
    path = (
        f"/datastore/{ahi_local.datastore_id}/imageSet/{record['imageSetId']}"
        f"/updateImageSetMetadata?latestVersion={record['version']}"
    )
    status, headers, answer = _raw(ahi_local, path, body)
    assert (status, headers["x-amzn-ErrorType"]) == (400, "ValidationException")
    assert "updatableAttributes" in json.loads(answer)["message"]
