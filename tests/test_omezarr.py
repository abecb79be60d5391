"""OME-Zarr writer/reader (NGFF 0.4, zarr v2 layout) and atomic writes."""

from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest

from voxelome.errors import VoxelomeError
from voxelome.io import (
    Volume,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    build_pyramid,
    create_ome_zarr,
    read_ome_zarr,
    read_volume,
    write_volume_ome_zarr,
)
from voxelome.io.omezarr import _downsample_block

SPACING = (2.0, 0.5, 0.25)


def _create(path, shape=(2, 9, 20, 17), **kw):
    args = dict(chunks_czyx=(1, 4, 8, 8), dtype="float32", spacing_um_zyx=SPACING,
                origin_um_zyx=(1.0, 2.0, 3.0), channel_names=["a", "b"])
    return create_ome_zarr(path, shape, **{**args, **kw})


def test_create_writes_ngff_metadata(tmp_path):
    p = tmp_path / "o.zarr"
    arr = _create(p)
    assert arr.shape == (2, 9, 20, 17) and arr.chunks == (1, 4, 8, 8) and float(arr[0, 0, 0, 0]) == 0.0
    assert json.loads((p / ".zgroup").read_text())["zarr_format"] == 2
    assert json.loads((p / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    attrs = json.loads((p / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][0]["type"] == "channel" and all(a["unit"] == "micrometer" for a in ms["axes"][1:])
    scale, trans = ms["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == [1.0, *SPACING] and trans["translation"] == [0.0, 1.0, 2.0, 3.0]
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["a", "b"]
    assert not [f for f in os.listdir(p) if ".tmp-" in f]


def test_reopen_same_params_keeps_data_and_different_params_error(tmp_path):
    p = tmp_path / "o.zarr"
    _create(p)[1, 2:4] = 5.0
    again = _create(p)  # a resumed run: same parameters re-open the store
    assert float(again[1, 3, 0, 0]) == 5.0
    for change in (dict(shape=(2, 9, 20, 18)), dict(chunks_czyx=(1, 4, 4, 8)), dict(dtype="uint16"),
                   dict(spacing_um_zyx=(2.0, 0.5, 0.3)), dict(channel_names=["a", "c"])):
        with pytest.raises(VoxelomeError, match="overwrite=True"):
            _create(p, **change)
    fresh = _create(p, spacing_um_zyx=(1.0, 1.0, 1.0), overwrite=True)
    assert float(fresh[1, 3, 0, 0]) == 0.0
    assert read_ome_zarr(p)[1] == (1.0, 1.0, 1.0)


def test_overwrite_refuses_a_folder_that_is_not_zarr(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("precious")
    with pytest.raises(VoxelomeError, match="refusing"):
        _create(tmp_path / "results", overwrite=True)
    assert (tmp_path / "results" / "notes.txt").exists()


def test_downsample_block_partial_edges():
    x = np.arange(3 * 5, dtype=np.float64).reshape(1, 1, 3, 5)
    out = _downsample_block(x, (1, 1, 2, 2), np.float64)
    assert out.shape == (1, 1, 2, 3)
    assert out[0, 0, 0, 0] == np.mean([0, 1, 5, 6])
    assert out[0, 0, 1, 2] == 14.0  # a lone corner voxel is its own mean
    assert out[0, 0, 0, 2] == np.mean([4, 9])


def _reference_level(a, f):
    """NumPy mean-pool with partial edge groups, the whole array at once."""
    return _downsample_block(a, f, a.dtype)


def test_pyramid_shapes_means_and_metadata(tmp_path):
    p = tmp_path / "o.zarr"
    rng = np.random.default_rng(0)
    data = rng.random((2, 40, 70, 33)).astype(np.float32)
    arr = _create(p, shape=data.shape, chunks_czyx=(1, 8, 16, 16))
    arr[:] = data
    shapes = build_pyramid(p, min_size=16)
    # z halves while ≥ 32 (40 → 20), y 70 → 35 → 18, x 33 → 17
    assert shapes == [(2, 40, 70, 33), (2, 20, 35, 17), (2, 20, 18, 17)]
    lvl1 = _reference_level(data, (1, 2, 2, 2))
    d1, s1, names = read_ome_zarr(p, level=1)
    np.testing.assert_allclose(d1.compute(), lvl1, rtol=1e-6)
    np.testing.assert_allclose(read_ome_zarr(p, level=2)[0].compute(), _reference_level(lvl1, (1, 1, 2, 1)), rtol=1e-6)
    assert s1 == (4.0, 1.0, 0.5) and names == ["a", "b"]
    ms = json.loads((p / ".zattrs").read_text())["multiscales"][0]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 2.0, 0.5]
    # voxel centres stay put: level-1 voxel 0 is the mean of level-0 voxels 0 and 1
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [0.0, 2.0, 2.25, 3.125]
    assert read_ome_zarr(p, level=2)[0].chunksize == (1, 8, 16, 16)
    with pytest.raises(VoxelomeError, match="levels 0…2"):
        read_ome_zarr(p, level=3)


def test_pyramid_n_levels_and_rebuild(tmp_path):
    p = tmp_path / "o.zarr"
    arr = _create(p, shape=(1, 64, 64, 64), channel_names=["x"], chunks_czyx=(1, 16, 16, 16))
    arr[:] = 1.0
    assert len(build_pyramid(p, n_levels=1, min_size=4)) == 2
    assert len(build_pyramid(p, min_size=8)) == 4  # 64 → 32 → 16 → 8
    assert not (p / "4").exists()
    assert len(build_pyramid(p, n_levels=1, min_size=8)) == 2  # rebuilding drops stale levels
    assert not (p / "2").exists()


def test_pyramid_integer_dtype_rounds(tmp_path):
    p = tmp_path / "i.zarr"
    arr = _create(p, shape=(1, 2, 2, 2), dtype="uint8", channel_names=["x"])
    arr[:] = np.array([0, 1, 0, 1, 0, 1, 0, 2], np.uint8).reshape(1, 2, 2, 2)
    build_pyramid(p, min_size=1)
    lvl, _, _ = read_ome_zarr(p, level=1)
    assert lvl.dtype == np.uint8 and int(lvl.compute().ravel()[0]) == 1  # mean 0.625 → 1


def test_write_volume_roundtrip_from_dask_and_volume(tmp_path):
    zyx = da.from_array(np.random.default_rng(1).random((20, 33, 40)).astype(np.float32), chunks=(7, 11, 13))
    p = write_volume_ome_zarr(tmp_path / "d.zarr", zyx, SPACING, min_size=8)
    v = read_volume(p)
    assert v.spacing_um == SPACING
    np.testing.assert_array_equal(v.data.compute(), zyx.compute())
    vol = Volume.from_array(zyx, 1.5, origin_um=(5.0, 6.0, 7.0))
    q = write_volume_ome_zarr(tmp_path / "v.zarr", vol, channel_names=["ct"])
    back = read_volume(q)
    assert back.spacing_um == (1.5, 1.5, 1.5) and back.origin_um == (5.0, 6.0, 7.0)


def test_read_ome_zarr_errors(tmp_path):
    with pytest.raises(VoxelomeError, match="no such"):
        read_ome_zarr(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=2)
    with pytest.raises(VoxelomeError, match="multiscales"):
        read_ome_zarr(tmp_path / "g.zarr")


# --- atomic writes ---------------------------------------------------------------------
def test_atomic_writes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": np.float32(1.5), "v": np.arange(3)})
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1.5, "v": [0, 1, 2]}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "c.json", {"bad": object()})
    assert json.loads((tmp_path / "c.json").read_text())["x"] == 1.5  # old file intact
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_atomic_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt")["w"].sum().item() == 2.0


def test_an_independent_ngff_validator_accepts_our_files_and_rejects_broken_ones(tmp_path):
    """The check other tests use (``yaozarrs``) is not vacuous: it fails on the faults a writer could make."""
    import json

    from ngff import assert_ngff_image
    from voxelome.io.omezarr import write_image_ome_zarr

    vol = write_volume_ome_zarr(tmp_path / "v.zarr", np.zeros((2, 16, 32, 32), np.float32), (10.0, 5.0, 5.0),
                                channel_names=["a", "b"], min_size=8)
    assert len(assert_ngff_image(vol, "czyx").multiscales[0].datasets) == 3
    img = write_image_ome_zarr(tmp_path / "i.zarr", np.zeros((2, 16, 32), np.float32), ["a", "b"], (5.0, 5.0))
    assert_ngff_image(img, "cyx")
    attrs_file = vol / ".zattrs"
    good = json.loads(attrs_file.read_text())

    def broken(edit):
        attrs = json.loads(json.dumps(good))
        edit(attrs["multiscales"][0])
        attrs_file.write_text(json.dumps(attrs))
        return vol

    faults = {  # each must be refused by the validator itself (a ValueError: pydantic's or the storage check's)
        "scale of the wrong length": lambda m: m["datasets"][0]["coordinateTransformations"][0].update(scale=[10.0, 5.0]),
        "an axis more than the arrays have": lambda m: m["axes"].insert(1, {"name": "t", "type": "time"}),
        "a level that is not there": lambda m: m["datasets"].append({**m["datasets"][-1], "path": "9"}),
        "a unit outside UDUNITS (a warning of the validator)": lambda m: m["axes"][1].update(unit="microns"),
    }
    for fault, edit in faults.items():
        with pytest.raises((ValueError, Warning)):
            assert_ngff_image(broken(edit))
            pytest.fail(f"the validator accepted {fault}")
    # what the specification allows but voxelome promises (µm) is checked on top
    with pytest.raises(AssertionError, match="millimeter"):
        assert_ngff_image(broken(lambda m: m["axes"][1].update(unit="millimeter")))
    attrs_file.write_text(json.dumps(good))
    assert_ngff_image(vol, "czyx")
