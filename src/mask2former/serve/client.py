"""A small client of `mask2former serve` on the standard library (used by the tests and the load test).

One `ServeClient` holds one keep-alive HTTP/1.1 connection; use one per thread.
"""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    def json(self):
        return json.loads(self.body)


def multipart_body(fields: dict[str, tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """{name: (file name, content type, data)} -> (multipart/form-data body, its Content-Type header)."""
    boundary = "mask2former-" + secrets.token_hex(12)
    parts = []
    for name, (file_name, content_type, data) in fields.items():
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{file_name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class ServeClient:
    """Requests to one server over one persistent connection (reopened after the server closes it)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> Reply:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def predict(
        self,
        data: bytes,
        file_name: str = "image.png",
        content_type: str = "image/png",
        multipart: bool = True,
        field_name: str = "image",
        **params,
    ) -> Reply:
        """POST /predict with query params (task, threshold, output, overlay): as a multipart upload of
        `field_name`, or (multipart=False) as the raw body with `content_type`."""
        path = "/predict" + (f"?{urlencode(params)}" if params else "")
        if multipart:
            body, header = multipart_body({field_name: (file_name, content_type, data)})
            return self.request("POST", path, body, {"Content-Type": header})
        return self.request("POST", path, data, {"Content-Type": content_type})

    def close(self) -> None:
        self.connection.close()
