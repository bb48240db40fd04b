"""Images by URL, fetched so that the server cannot be turned against the network it runs on.

A `data:` URL is decoded in place. An http(s) URL is resolved first, and refused when any of
its addresses is loopback, private, link-local or otherwise not public (unless the server was
started with --allow-private-urls); the connection then goes to the address that was checked
(no second lookup a DNS rebinding could answer differently), and each redirect is checked the
same way. Size and time are bounded. Local file paths are never read.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from gemma_mlx.errors import BadImage

MAX_REDIRECTS = 5
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address the host name resolves to."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM)})
    except socket.gaierror as e:
        raise BadImage(f"cannot resolve the image host {host} ({e.strerror}): check the URL") from e


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass
class ImageFetcher:
    allow_private: bool = False
    timeout_s: float = 20.0
    max_bytes: int = 64 * 1024 * 1024
    resolver: Resolver = resolve

    def fetch(self, url: str) -> bytes:
        """The bytes behind a data: or http(s) URL, or a one-line BadImage."""
        if url.startswith("data:"):
            return decode_data_url(url, self.max_bytes)
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self._get(url, deadline)
            if location is None:
                if status != 200:
                    raise BadImage(f"fetching the image {_short(url)} gave HTTP {status}: "
                                   "check the URL")
                return body
            url = urllib.parse.urljoin(url, location)
        raise BadImage(f"the image URL {_short(url)} redirects more than {MAX_REDIRECTS} "
                       "times: give the final URL")

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadImage(f"an image URL must be data:, http:// or https:// (got "
                           f"{_short(url)}); local files are not read")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = self.resolver(parts.hostname, port)
        if not self.allow_private:
            blocked = [a for a in addresses if not is_public(a)]
            if blocked or not addresses:
                raise BadImage(f"the image URL {_short(url)} points to a private or local "
                               f"address ({', '.join(blocked) or 'none'}); the server does not "
                               "fetch those (start it with --allow-private-urls to allow it)")
        connection = _pinned(parts.scheme, parts.hostname, port, addresses[0],
                             max(0.1, deadline - time.monotonic()))
        try:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", path, headers={"User-Agent": "gemma-mlx",
                                                     "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                return response.status, response.getheader("Location") or "", b""
            body = response.read(self.max_bytes + 1)
        except (OSError, http.client.HTTPException) as e:
            raise BadImage(f"could not fetch the image {_short(url)} ({e}): check the URL") from e
        finally:
            connection.close()
        if time.monotonic() > deadline:
            raise BadImage(f"fetching the image {_short(url)} took over {self.timeout_s:.0f} s")
        if len(body) > self.max_bytes:
            raise BadImage(f"the image at {_short(url)} is over {self.max_bytes >> 20} MB: "
                           "send a smaller one")
        return response.status, None, body


def _pinned(scheme: str, host: str, port: int, address: str,
            timeout: float) -> http.client.HTTPConnection:
    """A connection to `host` that goes to the already-checked `address`."""

    def connect(self: http.client.HTTPConnection) -> None:
        self.sock = socket.create_connection((address, port), timeout)
        if scheme == "https":
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)

    cls = type("PinnedConnection", (http.client.HTTPConnection,), {"connect": connect})
    return cls(host, port, timeout=timeout)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise BadImage("a data: image URL must be base64 (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise BadImage(f"the image is over {max_bytes >> 20} MB: send a smaller one")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"the data: image URL is not valid base64 ({e})") from e


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
