"""``image_url`` parts → PIL images, and an LRU of per-image results keyed by URL hash.

Images come as ``data:image/<fmt>;base64,...`` URLs or as http(s) URLs, which are
fetched unless fetching is disabled (``disable_fetch_requests``). The backends cache
the image *embeddings* made from them (expensive: a vision-tower forward) in an
:class:`ImageCache`, cleared when the model is unloaded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import httpx

from tabby.errors import InvalidRequest

__all__ = ["IMAGE_CACHE_SIZE", "ImageCache", "decode_data_url", "fetch_image", "url_key"]

# Images whose embeddings are kept (as upstream).
IMAGE_CACHE_SIZE = 32
FETCH_TIMEOUT_S = 30.0
V = TypeVar("V")


def url_key(url: str) -> str:
    """The cache key of an image URL (data URLs are long: hash them)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


class ImageCache(Generic[V]):
    """A small LRU; owned by one backend and used from its worker thread only."""

    def __init__(self, size: int = IMAGE_CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, url: str) -> V | None:
        key = url_key(url)
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, url: str, value: V) -> None:
        key = url_key(url)
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _open_image(data: bytes, source: str) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InvalidRequest("image input needs Pillow: pip install pillow", param="image_url") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{source} is not a readable image: {exc}", param="image_url") from None
    return image.convert("RGB")


def decode_data_url(url: str) -> Any:
    """A ``data:image/...;base64,`` URL → an RGB PIL image; anything else is a 400."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InvalidRequest(
            "an image data URL must look like data:image/<format>;base64,<data>", param="image_url"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URL is not valid base64", param="image_url") from None
    return _open_image(data, "the image data URL")


async def fetch_image(
    url: str, *, allow_fetch: bool, client: httpx.AsyncClient | None = None
) -> Any:
    """An ``image_url`` → an RGB PIL image (data URLs decoded, http(s) URLs fetched)."""
    if url.startswith("data:"):
        return decode_data_url(url)
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("an image URL must be a data: or http(s) URL", param="image_url")
    if not allow_fetch:
        raise InvalidRequest(
            "fetching images by URL is disabled on this server (disable_fetch_requests); "
            "send the image as a base64 data URL",
            param="image_url",
        )
    own = client is None
    http = client or httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=True)
    try:
        response = await http.get(url)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"could not fetch the image {url}: {exc}", param="image_url") from None
    finally:
        if own:
            await http.aclose()
    if response.status_code != 200:
        raise InvalidRequest(
            f"fetching the image {url} answered HTTP {response.status_code}", param="image_url"
        )
    return _open_image(response.content, f"the image at {url}")
