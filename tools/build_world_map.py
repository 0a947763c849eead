"""Build ``resources/world-110m.json.gz``: the console map's country outlines.

Run once by a developer when the outlines should change, never at runtime: the console
only reads the generated file (see ``console/geo.py``), so it needs no GIS library and no
network.

Source: Natural Earth 1:110m "Admin 0 – Countries" (public domain), as shipped in the
geopandas 0.14.4 wheel under ``geopandas/datasets/naturalearth_lowres/``. That copy is
pinned by the wheel's SHA-256, so a rebuild is reproducible. geopandas itself is not used:
the wheel is only opened as a zip, and the shapefile (.shp polygons, .dbf attributes) is
read with the small ``struct`` readers below.

Output (gzipped JSON, ``format`` = ``tether-world-110m/1``)::

    {"format": ..., "source": ..., "license": ..., "scale": 100,
     "countries": [{"name": "Germany", "iso_a3": "DEU", "continent": "Europe",
                    "rings": [[lon0, lat0, dlon1, dlat1, ...], ...]}, ...]}

Coordinates are integers in 1/``scale`` degree (0.01° ≈ 1.1 km, finer than the 1:110m
data's own detail). In each ring the first pair is absolute and every later pair is the
delta from the previous point. Rings are implicitly closed (the repeated closing point is
dropped) and keep the shapefile's orientation: outer rings clockwise, holes
counter-clockwise, so an odd-even fill draws holes right. Points that collapse onto their
predecessor after rounding are dropped, as are rings left with fewer than 3 points.
``iso_a3`` is null where Natural Earth has none (its "-99", e.g. Kosovo, N. Cyprus).

How it was run to make the committed file (2026-11-28, Python 3.11)::

    /work/main/.venv/bin/python tools/build_world_map.py

which runs ``python -m pip download geopandas==0.14.4 --no-deps`` into a temporary
directory, checks the wheel's SHA-256 and writes ``resources/world-110m.json.gz``.
It printed::

    countries: 177 (source 177)
    rings: 287 (source 288), points: 10296 (source 10355)
    json: 85,747 bytes; gzipped: 32,508 bytes -> .../resources/world-110m.json.gz

With a wheel already at hand: ``--wheel path/to/geopandas-0.14.4-py3-none-any.whl``;
with a loose shapefile: ``--shapefile path/to/naturalearth_lowres.shp`` (no hash check).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

GEOPANDAS_VERSION = "0.14.4"
WHEEL_NAME = f"geopandas-{GEOPANDAS_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "3bb6473cb59d51e1a7fe2dbc24a1a063fb0ebdeddf3ce08ddbf8c7ddc99689aa"
MEMBER_STEM = "geopandas/datasets/naturalearth_lowres/naturalearth_lowres"

FORMAT = "tether-world-110m/1"
SCALE = 100  # integer units per degree
SOURCE = (
    "Natural Earth 1:110m Admin 0 - Countries (ne_110m_admin_0_countries), "
    f"as shipped in the geopandas {GEOPANDAS_VERSION} wheel "
    "(geopandas/datasets/naturalearth_lowres); converted by tools/build_world_map.py"
)
LICENSE = (
    "Public domain. Made with Natural Earth. Free vector and raster map data "
    "@ naturalearthdata.com (no permission needed, no attribution required)."
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "resources" / "world-110m.json.gz"

SHP_FILE_CODE = 9994
SHP_NULL = 0
SHP_POLYGON = 5


@dataclass(frozen=True, slots=True)
class Country:
    name: str
    iso_a3: str | None
    continent: str
    rings: list[list[tuple[float, float]]]  # lon, lat; closed as in the shapefile


def read_shp_polygons(data: bytes) -> list[list[list[tuple[float, float]]]]:
    """Rings of every record of a polygon (type 5) shapefile; a null shape gives []."""
    file_code, file_words = struct.unpack_from(">i20xi", data, 0)
    version, shape_type = struct.unpack_from("<ii", data, 28)
    if file_code != SHP_FILE_CODE or version != 1000:
        raise ValueError("not an ESRI shapefile")
    if shape_type != SHP_POLYGON:
        raise ValueError(f"shape type {shape_type} is not supported (polygon = 5 only)")
    end = min(file_words * 2, len(data))
    records: list[list[list[tuple[float, float]]]] = []
    pos = 100
    while pos + 8 <= end:
        _number, content_words = struct.unpack_from(">ii", data, pos)
        body = pos + 8
        pos = body + content_words * 2
        (rec_type,) = struct.unpack_from("<i", data, body)
        if rec_type == SHP_NULL:
            records.append([])
            continue
        if rec_type != SHP_POLYGON:
            raise ValueError(f"record of shape type {rec_type} in a polygon file")
        n_parts, n_points = struct.unpack_from("<ii", data, body + 36)
        parts = struct.unpack_from(f"<{n_parts}i", data, body + 44)
        flat = struct.unpack_from(f"<{2 * n_points}d", data, body + 44 + 4 * n_parts)
        points = list(zip(flat[0::2], flat[1::2], strict=True))
        bounds = [*parts[1:], n_points]
        records.append([points[a:b] for a, b in zip(parts, bounds, strict=True)])
    return records


def read_dbf(data: bytes, encoding: str) -> list[dict[str, str]]:
    """Records of a dBASE III table as stripped strings; deleted records are skipped."""
    n_records, header_len, record_len = struct.unpack_from("<IHH", data, 4)
    fields: list[tuple[str, int]] = []
    pos = 32
    while data[pos] != 0x0D:
        raw_name, _type, length = struct.unpack_from("<11sc4xB", data, pos)
        fields.append((raw_name.split(b"\0", 1)[0].decode("ascii").lower(), length))
        pos += 32
    rows: list[dict[str, str]] = []
    for i in range(n_records):
        rec = data[header_len + i * record_len : header_len + (i + 1) * record_len]
        if rec[:1] == b"*":
            continue
        row: dict[str, str] = {}
        offset = 1
        for name, length in fields:
            row[name] = rec[offset : offset + length].decode(encoding).strip()
            offset += length
        rows.append(row)
    return rows


def read_countries(shp: bytes, dbf: bytes, cpg: bytes | None) -> list[Country]:
    """Join geometry and attributes record by record (a shapefile's only key is order)."""
    encoding = cpg.decode("ascii").strip() if cpg else "latin-1"
    shapes = read_shp_polygons(shp)
    rows = read_dbf(dbf, encoding)
    if len(shapes) != len(rows):
        raise ValueError(f"{len(shapes)} shapes but {len(rows)} attribute records")
    countries = []
    for rings, row in zip(shapes, rows, strict=True):
        iso = row.get("iso_a3", "")
        countries.append(
            Country(
                name=row["name"],
                iso_a3=None if iso in ("", "-99") else iso,
                continent=row.get("continent", ""),
                rings=rings,
            )
        )
    return countries


def encode_ring(ring: list[tuple[float, float]]) -> list[int] | None:
    """Quantize and delta-encode one ring; None when rounding leaves no area to draw."""
    quantized: list[tuple[int, int]] = []
    for lon, lat in ring:
        q = (round(lon * SCALE), round(lat * SCALE))
        if not quantized or q != quantized[-1]:
            quantized.append(q)
    while len(quantized) > 1 and quantized[-1] == quantized[0]:
        quantized.pop()
    if len(quantized) < 3:
        return None
    flat = [quantized[0][0], quantized[0][1]]
    for (x0, y0), (x1, y1) in pairwise(quantized):
        flat += [x1 - x0, y1 - y0]
    return flat


def build_document(countries: list[Country]) -> dict[str, object]:
    out = []
    for c in countries:
        rings = [r for r in map(encode_ring, c.rings) if r is not None]
        if not rings:
            print(f"  skipped {c.name!r}: no ring survives quantization", file=sys.stderr)
            continue
        out.append({"name": c.name, "iso_a3": c.iso_a3, "continent": c.continent, "rings": rings})
    return {
        "format": FORMAT,
        "source": SOURCE,
        "license": LICENSE,
        "scale": SCALE,
        "countries": out,
    }


def load_from_wheel(wheel: Path, check_hash: bool = True) -> list[Country]:
    blob = wheel.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if check_hash and digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        names = set(zf.namelist())
        cpg = zf.read(f"{MEMBER_STEM}.cpg") if f"{MEMBER_STEM}.cpg" in names else None
        return read_countries(zf.read(f"{MEMBER_STEM}.shp"), zf.read(f"{MEMBER_STEM}.dbf"), cpg)


def load_from_shapefile(shp: Path) -> list[Country]:
    cpg = shp.with_suffix(".cpg")
    return read_countries(
        shp.read_bytes(),
        shp.with_suffix(".dbf").read_bytes(),
        cpg.read_bytes() if cpg.exists() else None,
    )


def download_wheel(dest: Path) -> Path:
    """Fetch the pinned wheel with the ordinary pip client (no custom HTTP code)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"geopandas=={GEOPANDAS_VERSION}",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(dest),
        ],
        check=True,
    )
    return dest / WHEEL_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--wheel", type=Path, help=f"a local {WHEEL_NAME}")
    src.add_argument("--shapefile", type=Path, help="a local naturalearth_lowres.shp")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if args.shapefile:
        countries = load_from_shapefile(args.shapefile)
    elif args.wheel:
        countries = load_from_wheel(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            countries = load_from_wheel(download_wheel(Path(tmp)))

    doc = build_document(countries)
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # mtime=0 and no file name in the header: the same input gives byte-identical output.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as gz:
        gz.write(raw)
    packed = buf.getvalue()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(packed)

    kept = doc["countries"]
    assert isinstance(kept, list)
    n_rings = sum(len(c["rings"]) for c in kept)
    n_points = sum(len(r) // 2 for c in kept for r in c["rings"])
    src_rings = sum(len(c.rings) for c in countries)
    src_points = sum(len(r) - 1 for c in countries for r in c.rings)
    print(f"countries: {len(kept)} (source {len(countries)})")
    print(f"rings: {n_rings} (source {src_rings}), points: {n_points} (source {src_points})")
    print(f"json: {len(raw):,} bytes; gzipped: {len(packed):,} bytes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
