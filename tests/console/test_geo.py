"""console.geo and console.resources: map data, projection, placement, clustering (no Qt)."""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from console import geo
from console.resources import ENV_VAR, resource_path

REPO = Path(__file__).resolve().parents[2]
BERLIN = (52.52, 13.40)  # lat, lon
REQUIRED_REGIONS = [
    "eu-central",
    "eu-west",
    "eu-south",
    "eu-north",
    "us-east",
    "us-west",
    "us-central",
    "ca-central",
    "sa-east",
    "af-south",
    "af-east",
    "me",
    "me-central",
    "ap-south",
    "ap-southeast",
    "ap-northeast",
    "ap-east",
    "ap-oceania",
    "us-east-1",
    "europe-west1",
    "westeurope",
]


def _lon_diff(a: np.ndarray, b: float) -> np.ndarray:
    return (a - b + 180.0) % 360.0 - 180.0


def _point_in_ring(lon: float, lat: float, ring: np.ndarray) -> bool:
    """Even-odd ray cast; independent of geo so it checks the decoded rings."""
    inside = False
    for (x0, y0), (x1, y1) in pairwise(ring.tolist()):
        if (y0 > lat) != (y1 > lat) and lon < x0 + (lat - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


# --------------------------------------------------------------------------- resources


def test_resource_path_finds_world_map_in_checkout() -> None:
    path = resource_path(geo.WORLD_RESOURCE)
    assert path == REPO / "resources" / geo.WORLD_RESOURCE
    assert path.stat().st_size < 300_000


@pytest.mark.parametrize("name", ["", "../pyproject.toml", "/etc/passwd", "a/../../x", "a\\b"])
def test_resource_path_rejects_escaping_names(name: str) -> None:
    with pytest.raises(ValueError):
        resource_path(name)


def test_resource_path_env_override_and_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only-here.txt").write_text("x")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert resource_path("only-here.txt") == tmp_path / "only-here.txt"
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resource_path("does-not-exist.json")


# --------------------------------------------------------------------------- world data


def test_world_loads_once_with_plausible_contents() -> None:
    world = geo.load_world()
    assert geo.load_world() is world
    assert 170 <= world.n_countries <= 180
    assert world.n_rings >= world.n_countries
    assert "Natural Earth" in world.source
    assert "ublic domain" in world.license
    assert {"Europe", "Asia", "Africa", "Oceania"} <= set(world.continents)
    lon, lat = world.lonlat[:, 0], world.lonlat[:, 1]
    assert lon.min() >= -180 and lon.max() <= 180
    assert lat.min() >= -90 and lat.max() <= 90
    assert world.ring_offsets[0] == 0 and world.ring_offsets[-1] == world.n_points
    assert world.country_rings[-1] == world.n_rings
    assert len(world.ring_country) == world.n_rings


def test_world_arrays_are_read_only() -> None:
    world = geo.load_world()
    with pytest.raises(ValueError):
        world.lonlat[0, 0] = 1.0


def test_rings_are_closed_and_connect_mask_splits_them() -> None:
    world = geo.load_world()
    starts, ends = world.ring_offsets[:-1], world.ring_offsets[1:] - 1
    np.testing.assert_array_equal(world.lonlat[starts], world.lonlat[ends])
    assert (ends - starts >= 3).all()
    conn = world.connect()
    assert not conn[ends].any()
    assert conn.sum() == world.n_points - world.n_rings


def test_berlin_is_in_germany() -> None:
    world = geo.load_world()
    de = world.country_index("DEU")
    assert world.country_index("germany") == de == world.country_index(" deu ")
    assert world.names[de] == "Germany" and world.continents[de] == "Europe"
    lon_min, lat_min, lon_max, lat_max = world.bounds[de]
    lat, lon = BERLIN
    assert lon_min <= lon <= lon_max and lat_min <= lat <= lat_max
    assert any(_point_in_ring(lon, lat, r) for r in world.rings_of(de))
    fr = world.country_index("FRA")
    assert not any(_point_in_ring(lon, lat, r) for r in world.rings_of(fr))


def test_unknown_country_raises_key_error() -> None:
    with pytest.raises(KeyError):
        geo.load_world().country_index("Atlantis")


def test_projected_matches_projection() -> None:
    world = geo.load_world()
    proj = geo.Equirectangular(lat_ts=30.0)
    xy = world.projected(proj)
    assert xy.shape == world.lonlat.shape
    np.testing.assert_allclose(xy[:, 0], world.lonlat[:, 0] * math.cos(math.radians(30)))
    np.testing.assert_allclose(xy[:, 1], world.lonlat[:, 1])


def test_geo_does_not_import_qt() -> None:
    code = (
        "import sys, console.geo; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- builder


def _load_builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_world_map", REPO / "tools" / "build_world_map.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def _tiny_shapefile(ring: list[tuple[float, float]]) -> tuple[bytes, bytes]:
    """One polygon record and its dBASE row, written per the ESRI/dBASE layouts."""
    n = len(ring)
    content = struct.pack("<i4d", 5, 0, 0, 0, 0) + struct.pack("<iii", 1, n, 0)
    content += struct.pack(f"<{2 * n}d", *(v for p in ring for v in p))
    record = struct.pack(">ii", 1, len(content) // 2) + content
    header = struct.pack(">i20xi", 9994, (100 + len(record)) // 2)
    header += struct.pack("<ii4d4d", 1000, 5, 0, 0, 0, 0, 0, 0, 0, 0)
    fields = [(b"continent", 20), (b"name", 20), (b"iso_a3", 4)]
    rec_len = 1 + sum(length for _, length in fields)
    head_len = 32 + 32 * len(fields) + 1
    dbf = struct.pack("<B3xIHH20x", 3, 1, head_len, rec_len)
    for name, length in fields:
        dbf += struct.pack("<11sc4xB15x", name, b"C", length)
    dbf += b"\x0d" + b" "
    for value, (_, length) in zip(["Europe", "Testland", "-99"], fields, strict=True):
        dbf += value.encode("latin-1").ljust(length)
    return header + record, dbf


def test_builder_reads_shapefile_and_round_trips_through_geo() -> None:
    builder = _load_builder()
    ring = [(10.0, 50.0), (10.0, 51.004), (11.5, 51.0), (11.5, 50.0), (10.0, 50.0)]
    shp, dbf = _tiny_shapefile(ring)
    countries = builder.read_countries(shp, dbf, b"ISO-8859-1")
    assert [(c.name, c.iso_a3, c.continent) for c in countries] == [("Testland", None, "Europe")]
    doc = builder.build_document(countries)
    assert doc["countries"][0]["rings"] == [[1000, 5000, 0, 100, 150, 0, 0, -100]]
    world = geo._decode_world(doc)
    expected = np.array([(10.0, 50.0), (10.0, 51.0), (11.5, 51.0), (11.5, 50.0), (10.0, 50.0)])
    np.testing.assert_allclose(world.lonlat, expected)
    np.testing.assert_allclose(world.bounds, [[10.0, 50.0, 11.5, 51.0]])


def test_builder_drops_rings_that_collapse() -> None:
    builder = _load_builder()
    assert builder.encode_ring([(0.001, 0.001), (0.002, 0.001), (0.001, 0.002)]) is None


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize(
    "proj",
    [geo.Equirectangular(), geo.Equirectangular(lat_ts=37.5, scale=3.0, y_down=True)],
)
def test_projection_round_trips(proj: geo.Equirectangular) -> None:
    rng = np.random.default_rng(7)
    lon = rng.uniform(-180, 180, 1000)
    lat = rng.uniform(-90, 90, 1000)
    x, y = geo.project_arrays(lon, lat, proj)
    lon2, lat2 = geo.unproject_arrays(x, y, proj)
    np.testing.assert_allclose(lon2, lon, atol=1e-9)
    np.testing.assert_allclose(lat2, lat, atol=1e-9)
    px, py = geo.project(13.4, 52.52, proj)
    assert isinstance(px, float) and isinstance(py, float)
    assert geo.unproject(px, py, proj) == pytest.approx((13.4, 52.52))


def test_default_projection_is_plate_carree() -> None:
    assert geo.project(180.0, -90.0) == (180.0, -90.0)
    assert geo.DEFAULT_PROJECTION.extent == (-180.0, -90.0, 180.0, 90.0)
    flipped = geo.Equirectangular(y_down=True, scale=2.0)
    assert geo.project(0.0, 45.0, flipped) == (0.0, -90.0)
    assert flipped.extent == (-360.0, -180.0, 360.0, 180.0)


@pytest.mark.parametrize("kwargs", [{"lat_ts": 90.0}, {"scale": 0.0}, {"scale": math.inf}])
def test_projection_rejects_degenerate_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        geo.Equirectangular(**kwargs)


# --------------------------------------------------------------------------- regions


def test_region_table_covers_required_names_with_valid_coordinates() -> None:
    for name in REQUIRED_REGIONS:
        assert name in geo.REGION_CENTRES, name
    for name, (lat, lon) in geo.REGION_CENTRES.items():
        assert -90 <= lat <= 90 and -180 <= lon <= 180, name
        assert abs(lat) + abs(lon) > 5, name


def test_region_centres_are_on_the_right_continent() -> None:
    assert geo.region_centre("eu-central") == pytest.approx((50.11, 8.68))
    assert geo.region_centre("us-west")[1] < -100  # type: ignore[index]
    assert geo.region_centre("ap-oceania")[0] < -20  # type: ignore[index]
    assert geo.region_centre("sa-east")[0] < 0  # type: ignore[index]


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("EU_Central", "eu-central"),
        (" us-east-1a ", "us-east-1"),
        ("europe-west1-b", "europe-west1"),
        ("eu-central-9", "eu-central"),
        ("WestEurope", "westeurope"),
    ],
)
def test_region_lookup_normalizes(alias: str, canonical: str) -> None:
    assert geo.region_centre(alias) == geo.REGION_CENTRES[canonical]


def test_region_lookup_unknown() -> None:
    assert geo.region_centre("mars-north-1") is None
    assert geo.region_centre(None) is None
    assert geo.region_centre("") is None


# --------------------------------------------------------------------------- placement


def _ids(n: int, prefix: str = "agent") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def test_place_agents_is_deterministic_and_order_independent() -> None:
    ids = _ids(500)
    regions = ["eu-central" if i % 3 else "ap-southeast" for i in range(500)]
    lon1, lat1 = geo.place_agents(ids, regions)
    lon2, lat2 = geo.place_agents(ids, regions)
    np.testing.assert_array_equal(lon1, lon2)
    np.testing.assert_array_equal(lat1, lat2)
    # Placing a subset (e.g. only the agents that changed) gives the same spots.
    lon3, lat3 = geo.place_agents(ids[::-7], regions[::-7])
    np.testing.assert_array_equal(lon3, lon1[::-7])
    np.testing.assert_array_equal(lat3, lat1[::-7])
    # Distinct ids get distinct spots.
    assert len(set(zip(lon1.tolist(), lat1.tolist(), strict=True))) == 500


@pytest.mark.parametrize("spread", [3.0, 4.0, 6.0])
def test_place_agents_stays_within_spread_of_region_centre(spread: float) -> None:
    ids = _ids(2000)
    lon, lat = geo.place_agents(ids, ["us-east"] * 2000, spread_deg=spread)
    c_lat, c_lon = geo.REGION_CENTRES["us-east"]
    dist = np.hypot(_lon_diff(lon, c_lon), lat - c_lat)
    assert dist.max() <= spread + 1e-9
    assert dist.mean() > spread / 2  # actually spread over the disc, not piled at the centre
    assert geo.place_agents(ids[:3], ["us-east"] * 3, spread_deg=0.0)[1].tolist() == [c_lat] * 3


def test_place_agents_uses_valid_locations_only() -> None:
    ids = _ids(5)
    locations = [(48.14, 11.58), None, (0.0, 0.0), (95.0, 10.0), (math.nan, 3.0)]
    lon, lat = geo.place_agents(ids, ["ap-northeast"] * 5, locations)
    assert (lat[0], lon[0]) == (48.14, 11.58)
    c_lat, c_lon = geo.REGION_CENTRES["ap-northeast"]
    dist = np.hypot(_lon_diff(lon[1:], c_lon), lat[1:] - c_lat)
    assert (dist <= 4.0 + 1e-9).all()


def test_unknown_regions_cluster_together_and_never_at_null_island() -> None:
    names = [f"zz-nowhere-{i}" for i in range(300)] + ["", "Mars", "eu-cenrtal"]
    for name in names:
        lon, lat = geo.place_agents(_ids(40, name), [name] * 40)
        assert np.hypot(lon, lat).min() > 20.0, name
        # One unknown region = one tight group (disc of radius 4° around one centre).
        span = np.hypot(_lon_diff(lon, float(lon[0])), lat - lat[0]).max()
        assert span <= 8.0 + 1e-9, name
    # Missing region behaves like the empty name, deterministically.
    a = geo.place_agents(["x"], [None])
    b = geo.place_agents(["x"], [""])
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def test_different_unknown_regions_get_different_centres() -> None:
    centres = {geo._unknown_region_centre(f"region-{i}") for i in range(50)}
    assert len(centres) == 50


def test_place_agents_output_ranges_and_length_checks() -> None:
    ids = _ids(3000)
    regions = list(geo.REGION_CENTRES)
    regions = [regions[i % len(regions)] for i in range(3000)]
    lon, lat = geo.place_agents(ids, regions)
    assert lon.shape == lat.shape == (3000,)
    assert (lon >= -180).all() and (lon < 180).all()
    assert (lat >= -90).all() and (lat <= 90).all()
    with pytest.raises(ValueError):
        geo.place_agents(ids, regions[:-1])
    with pytest.raises(ValueError):
        geo.place_agents(ids, regions, [None])
    assert [a.size for a in geo.place_agents([], [])] == [0, 0]


# --------------------------------------------------------------------------- clustering


def _brute_force(x: np.ndarray, y: np.ndarray, cell: float, rank: np.ndarray) -> dict:
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(x)):
        groups.setdefault((math.floor(x[i] / cell), math.floor(y[i] / cell)), []).append(i)
    return {k: (len(v), max(rank[v])) for k, v in groups.items()}


@pytest.mark.parametrize("cell", [0.25, 3.0, 45.0, 1000.0])
def test_clusters_match_brute_force(cell: float) -> None:
    rng = np.random.default_rng(int(cell * 100))
    x = rng.uniform(-180, 180, 3000)
    y = rng.uniform(-90, 90, 3000)
    rank = rng.integers(0, 3, 3000)
    c = geo.cluster_points(x, y, cell, rank)
    assert c.count.sum() == 3000
    assert len(c.x) == len(c.y) == len(c.count) == len(c.worst)
    expected = _brute_force(x, y, cell, rank)
    assert len(expected) == len(c.count)
    for k in range(len(c.count)):
        members = np.flatnonzero(c.labels == k)
        assert len(members) == c.count[k]
        assert c.worst[k] == rank[members].max()
        assert c.x[k] == pytest.approx(x[members].mean())
        assert c.y[k] == pytest.approx(y[members].mean())
        cell_key = (math.floor(x[members[0]] / cell), math.floor(y[members[0]] / cell))
        assert expected[cell_key] == (c.count[k], c.worst[k])


def test_cluster_keeps_worst_rank_of_a_single_offline_agent() -> None:
    x = np.array([1.0, 1.1, 1.2, 50.0])
    y = np.array([1.0, 1.1, 1.2, 50.0])
    c = geo.cluster_points(x, y, 2.0, [0, 2, 0, 1])
    assert c.count.tolist() == [3, 1]
    assert c.worst.tolist() == [2, 1]
    assert c.labels.tolist() == [0, 0, 0, 1]


def test_cluster_grid_is_anchored_so_other_clusters_do_not_move() -> None:
    x = np.array([0.5, 0.7, 5.5])
    y = np.array([0.5, 0.7, 5.5])
    a = geo.cluster_points(x, y, 1.0)
    b = geo.cluster_points(np.append(x, -170.0), np.append(y, 80.0), 1.0)
    assert set(zip(a.x.tolist(), a.count.tolist(), strict=True)) <= set(
        zip(b.x.tolist(), b.count.tolist(), strict=True)
    )
    assert a.worst.tolist() == [0, 0]  # rank defaults to 0


def test_cluster_edge_cases() -> None:
    empty = geo.cluster_points([], [], 1.0)
    assert all(len(a) == 0 for a in empty)
    with pytest.raises(ValueError):
        geo.cluster_points([0.0, math.nan], [0.0, 0.0], 1.0)
    with pytest.raises(ValueError):
        geo.cluster_points([0.0], [0.0], 0.0)
    with pytest.raises(ValueError):
        geo.cluster_points([0.0], [0.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        geo.cluster_points([0.0], [0.0], 1.0, rank=[1, 2])
    with pytest.raises(ValueError):
        geo.cluster_points([-1e300, 1e300], [0.0, 0.0], 1e-300)


def test_cluster_cell_size_snaps_to_powers_of_two() -> None:
    assert geo.cluster_cell_size(12.0, cell_px=48.0) == 4.0
    assert geo.cluster_cell_size(13.0, cell_px=48.0) == 4.0
    assert geo.cluster_cell_size(0.75, cell_px=48.0) == 64.0
    size = geo.cluster_cell_size(3.3)
    assert math.log2(size).is_integer()
    with pytest.raises(ValueError):
        geo.cluster_cell_size(0.0)


def test_cluster_20k_is_fast() -> None:
    """Loose guard for the < 20 ms target (typically ~3.5 ms here); best of 5 runs."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-180, 180, 20_000)
    y = rng.uniform(-60, 75, 20_000)
    rank = rng.integers(0, 3, 20_000)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        c = geo.cluster_points(x, y, 2.0, rank)
        best = min(best, time.perf_counter() - t0)
    assert c.count.sum() == 20_000
    assert best < 0.020
