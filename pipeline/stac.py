"""STAC inputs: a STAC Item, ItemCollection or static Catalog/Collection (a `.json` file, local or any fsspec URL)
gives one asset per item, chosen by key (default `visual`), or several band assets combined into one raster
(`bands: [B04, B03, B02]` naming asset keys; `pipeline.raster` resamples them to the finest band's grid), with
the item's id and datetime, which `pipeline.sources` carries into every row of it (`stac_item`, `datetime`).

pystac reads the documents, through the job's fsspec filesystems (`_FsspecStacIO`: each URL gets its own storage
options), and resolves relative asset hrefs. A signed asset URL (presigned S3, SAS) is the URL read and nothing
more: its identity (`canonical_uri`) drops the signature, and only the identity is ever written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .storage import filesystem, translate_error

__all__ = ["is_stac", "stac_assets", "search_assets", "check_search", "StacAsset", "DEFAULT_ASSET"]

_SEARCH_FIELDS = {"url", "collections", "bbox", "datetime", "limit"}

DEFAULT_ASSET = "visual"


def is_stac(uri: str) -> bool:
    """Whether an input names a STAC document (by extension; its `type` decides what it is)."""
    return uri.split("?", 1)[0].lower().endswith(".json")


def _stac_io(storage_options: dict | None):
    import pystac

    class _FsspecStacIO(pystac.StacIO):
        """pystac's reads through the project's filesystems (s3://, local, any fsspec URL); never writes."""

        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            uri = str(source)
            fs, path = filesystem(uri, storage_options)
            try:
                with fs.open(path, "rb") as f:
                    return f.read().decode("utf-8")
            except Exception as e:
                raise translate_error(e, f"STAC document {uri}") from e

        def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
            raise PermissionError(f"{dest}: fpn does not write STAC documents")

    return _FsspecStacIO()


@dataclass(frozen=True)
class StacAsset:
    href: str  # absolute; a signed URL keeps its signature here (band assets: the first band's)
    item: str  # the item's id
    datetime: str  # the item's datetime (or start_datetime), ISO 8601; "" when it has none
    item_href: str = ""  # the item's document (`DOC#id` inside a collection document)
    bands: tuple[str, ...] = ()  # band assets combined: their hrefs in the model's channel order


def stac_assets(uri: str, storage_options: dict | None = None, *, asset: str = DEFAULT_ASSET,
                bands: tuple[str, ...] = ()) -> list[StacAsset]:
    """The chosen asset (or band assets, `bands` naming their keys) of each item of a STAC Item, ItemCollection or
    Catalog/Collection (its items, recursively). Raises ValueError naming the document and the problem (not STAC;
    an item without the asset)."""
    import pystac

    io = _stac_io(storage_options)
    try:
        doc = json.loads(io.read_text(uri))
    except ValueError as e:
        raise ValueError(f"input {uri}: not JSON ({e})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "Feature":
            items = [pystac.Item.from_dict(doc, href=uri)]
            items[0].set_self_href(uri)
        elif kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc, preserve_dict=False))
        elif kind in ("Catalog", "Collection"):
            cat = pystac.read_dict(doc, href=uri, stac_io=io)
            cat.set_self_href(uri)
            items = list(cat.get_items(recursive=True))
        else:
            raise ValueError(f"type {kind!r} is not a STAC Item, ItemCollection, Catalog or Collection")
    except (pystac.STACError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"input {uri}: not a usable STAC document ({e})") from e
    return _pick(items, asset, bands, f"input {uri}", uri)


def _pick(items, asset: str, bands: tuple[str, ...], where: str, base: str) -> list[StacAsset]:
    from pystac.utils import make_absolute_href

    out = []
    for item in items:
        keys = bands or (asset,)
        missing = [k for k in keys if k not in item.assets]
        if missing:
            raise ValueError(f"{where}: STAC item {item.id} has no asset {missing[0]!r} "
                             f"(it has {', '.join(sorted(item.assets)) or 'none'}): choose "
                             f"{'bands' if bands else 'one with stac_asset'}")
        hrefs = []
        for k in keys:
            href = item.assets[k].href
            if "://" not in href and not href.startswith("/"):  # relative to the item's document
                href = make_absolute_href(href, item.get_self_href() or base)
            hrefs.append(href)
        when = item.datetime or item.common_metadata.start_datetime
        out.append(StacAsset(hrefs[0], item.id, when.isoformat() if when else "",
                             item.get_self_href() or f"{base}#{item.id}", tuple(hrefs) if bands else ()))
    return out


def check_search(search: dict) -> None:
    """Validate a STAC API search (`{url, collections, bbox, datetime, limit}`); ValueError naming the field."""
    if not isinstance(search, dict) or not isinstance(search.get("url"), str):
        raise ValueError(f"stac_search: expected {{url: ..., collections: [...], bbox: [...], datetime: ..., limit: N}},"
                         f" got {search!r}")
    unknown = sorted(set(search) - _SEARCH_FIELDS)
    if unknown:
        raise ValueError(f"stac_search.{unknown[0]}: unknown (known: {', '.join(sorted(_SEARCH_FIELDS))})")
    if "bbox" in search and not (isinstance(search["bbox"], (list, tuple)) and len(search["bbox"]) == 4):
        raise ValueError(f"stac_search.bbox: expected [minlon, minlat, maxlon, maxlat], got {search['bbox']!r}")
    if "limit" in search and not (isinstance(search["limit"], int) and search["limit"] > 0):
        raise ValueError(f"stac_search.limit: expected a positive number of items, got {search['limit']!r}")


def search_assets(search: dict, *, asset: str = DEFAULT_ASSET, bands: tuple[str, ...] = ()) -> list[StacAsset]:
    """The chosen asset of each item a STAC API search finds (pystac-client: collections, bbox in WGS 84, a
    datetime or interval, at most `limit` items). Raises ConnectionError or ValueError naming the API."""
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    check_search(search)
    url = search["url"]
    try:
        client = Client.open(url)
        found = client.search(collections=search.get("collections"), bbox=search.get("bbox"),
                              datetime=search.get("datetime"), max_items=search.get("limit"))
        items = list(found.items())
    except APIError as e:
        raise ValueError(f"STAC API {url}: the search failed ({str(e).splitlines()[0] if str(e) else e})") from e
    except OSError as e:
        raise ConnectionError(f"STAC API {url}: cannot reach it ({e})") from e
    return _pick(items, asset, bands, f"STAC API {url}", url)
