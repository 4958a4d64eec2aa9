"""Fetch and decode task images safely.

Where an image may come from:
- ``/data/upload/...`` and other paths relative to Label Studio: fetched from the LS host
  with the API key (``Authorization: Token <key>``, or ``Bearer <access>`` for a
  personal-access JWT, exchanged once at ``/api/token/refresh``);
- ``/data/local-files/?d=<path>``: read from ``IHP_LOCAL_ROOT`` when set (the path must stay
  under it), else fetched from Label Studio like an upload;
- ``http(s)://`` URLs: only to the LS host or hosts in ``IHP_ALLOWED_HOSTS``; every resolved
  address is checked (no link-local, metadata, multicast or unspecified addresses; private and
  loopback addresses only when the host is explicitly allowed or is the LS host); redirects are
  followed by hand and re-checked; connect/read timeouts and a byte cap apply;
- ``data:image/...;base64,`` URIs.
Everything else (``file://``, ``ftp://``, ...) is refused. Decoding refuses images above
``max_pixels`` before the pixels are decompressed.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import numpy as np
import requests
from PIL import Image


class ImageFetchError(ValueError):
    """The image cannot be fetched or decoded; the message says why (shown to the user)."""


@dataclass
class FetchSettings:
    ls_url: str = ""
    api_key: str = ""
    allowed_hosts: tuple[str, ...] = ()
    local_root: str = ""
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    max_redirects: int = 3


def _host_of(url: str) -> str:
    return (urlparse(url).hostname or "").lower()


def check_address(host: str, allowed_explicitly: bool) -> None:
    """Resolve ``host`` and refuse addresses an SSRF would aim at."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise ImageFetchError(f"cannot resolve image host {host!r}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
            raise ImageFetchError(f"image host {host!r} resolves to a forbidden address ({ip})")
        if (ip.is_private or ip.is_loopback) and not allowed_explicitly:
            raise ImageFetchError(f"image host {host!r} resolves to a private address ({ip}) "
                                  f"and is not in IHP_ALLOWED_HOSTS")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 RGB (H, W, 3), refusing decompression bombs before decoding."""
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception:
        raise ImageFetchError("the image data is not an image PIL can read") from None
    if w * h > max_pixels:
        raise ImageFetchError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                              f"(IHP_MAX_IMAGE_PIXELS)")
    try:
        im.load()
        # convert() copies even an RGB image: a 12 MP photo's decode peaked 44 MB higher for it
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:
        raise ImageFetchError(f"the image could not be decoded ({type(e).__name__}: truncated or corrupt)") from None


class ImageFetcher:
    """Fetches images by task URL with a small LRU cache of decoded arrays: at most
    ``cache_size`` photos and ``cache_bytes`` of pixels (the newest is always kept). Counted in
    photos alone, 16 phone photos (34 MB each at 12 MP) would have held 550 MB per worker."""

    def __init__(self, settings: FetchSettings, cache_size: int = 16, cache_bytes: int = 128 << 20):
        self.s = settings
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size, self._cache_bytes = cache_size, cache_bytes
        self._lock = threading.Lock()
        self._bearer: str | None = None
        self.session = requests.Session()
        self.session.trust_env = False

    # -- auth -------------------------------------------------------------------------------
    def _auth_header(self) -> dict:
        key = self.s.api_key
        if not key:
            return {}
        if key.count(".") == 2:  # a personal access token (JWT refresh token)
            if self._bearer is None:
                try:
                    r = self.session.post(urljoin(self.s.ls_url, "/api/token/refresh"),
                                          json={"refresh": key},
                                          timeout=(self.s.connect_timeout, self.s.read_timeout))
                    r.raise_for_status()
                    self._bearer = r.json()["access"]
                except Exception as e:
                    raise ImageFetchError(f"could not exchange the personal access token at "
                                          f"Label Studio ({type(e).__name__})") from None
            return {"Authorization": f"Bearer {self._bearer}"}
        return {"Authorization": f"Token {key}"}

    # -- sources ----------------------------------------------------------------------------
    def _local_file(self, url: str) -> bytes | None:
        q = parse_qs(urlparse(url).query)
        if not self.s.local_root or "d" not in q:
            return None
        root = os.path.realpath(self.s.local_root)
        path = os.path.realpath(os.path.join(root, unquote(q["d"][0]).lstrip("/")))
        if os.path.commonpath([root, path]) != root:
            raise ImageFetchError("local-files path escapes IHP_LOCAL_ROOT")
        if not os.path.isfile(path):
            raise ImageFetchError(f"local file not found under IHP_LOCAL_ROOT: {q['d'][0]}")
        if os.path.getsize(path) > self.s.max_bytes:
            raise ImageFetchError(f"image file is larger than {self.s.max_bytes} bytes")
        with open(path, "rb") as f:
            return f.read()

    def _http(self, url: str) -> bytes:
        ls_host = _host_of(self.s.ls_url)
        allowed = {h.lower() for h in self.s.allowed_hosts if h}
        for _ in range(self.s.max_redirects + 1):
            p = urlparse(url)
            if p.scheme not in ("http", "https"):
                raise ImageFetchError(f"image URL scheme {p.scheme!r} is not allowed (http/https only)")
            host = (p.hostname or "").lower()
            is_ls = bool(ls_host) and host == ls_host and (urlparse(self.s.ls_url).port == p.port)
            if not is_ls and host not in allowed:
                raise ImageFetchError(f"image host {host!r} is neither the Label Studio host nor in "
                                      f"IHP_ALLOWED_HOSTS")
            check_address(host, allowed_explicitly=True if (is_ls or host in allowed) else False)
            headers = self._auth_header() if is_ls else {}
            try:
                r = self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                     timeout=(self.s.connect_timeout, self.s.read_timeout))
            except requests.Timeout:
                raise ImageFetchError(f"timed out fetching the image from {host}") from None
            except requests.RequestException as e:
                raise ImageFetchError(f"could not fetch the image from {host} ({type(e).__name__})") from None
            with r:
                if r.is_redirect:
                    url = urljoin(url, r.headers.get("Location", ""))
                    continue
                if r.status_code != 200:
                    raise ImageFetchError(f"fetching the image returned HTTP {r.status_code}")
                n = int(r.headers.get("Content-Length") or 0)
                if n > self.s.max_bytes:
                    raise ImageFetchError(f"image is {n} bytes, above the limit of {self.s.max_bytes}")
                buf = bytearray()
                try:
                    for chunk in r.iter_content(1 << 16):
                        buf += chunk
                        if len(buf) > self.s.max_bytes:
                            raise ImageFetchError(f"image is larger than {self.s.max_bytes} bytes")
                except requests.RequestException:
                    raise ImageFetchError("the image download was interrupted") from None
                return bytes(buf)
        raise ImageFetchError("too many redirects fetching the image")

    def fetch_bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise ImageFetchError("the task has no image URL")
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            if ";base64" not in head:
                raise ImageFetchError("only base64 data: URIs are supported")
            if len(payload) > self.s.max_bytes * 4 // 3 + 4:
                raise ImageFetchError("data: URI image is too large")
            try:
                return base64.b64decode(payload, validate=False)
            except Exception:
                raise ImageFetchError("data: URI is not valid base64") from None
        p = urlparse(url)
        if p.scheme in ("http", "https"):
            return self._http(url)
        if p.scheme:
            raise ImageFetchError(f"image URL scheme {p.scheme!r} is not allowed (http/https only)")
        if url.startswith("/data/local-files"):
            data = self._local_file(url)
            if data is not None:
                return data
        if not self.s.ls_url:
            raise ImageFetchError(f"{url!r} is relative to Label Studio but LABEL_STUDIO_URL is not set")
        return self._http(urljoin(self.s.ls_url, url))

    def get(self, url: str) -> np.ndarray:
        with self._lock:
            if url in self._cache:
                self._cache.move_to_end(url)
                return self._cache[url]
        img = decode_image(self.fetch_bytes(url), self.s.max_pixels)
        with self._lock:
            self._cache[url] = img
            held = sum(a.nbytes for a in self._cache.values())
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size or held > self._cache_bytes):
                held -= self._cache.popitem(last=False)[1].nbytes
        return img
