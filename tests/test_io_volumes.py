"""Volume readers: every format round-trips into a lazy (z, y, x) Volume with spacing in µm."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from voxelome.errors import VoxelomeError
from voxelome.io import Volume, create_ome_zarr, read_volume, write_volume_ome_zarr

tifffile = pytest.importorskip("tifffile")
SHARED = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture
def vol():
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, size=(6, 20, 30)).astype(np.uint16)


def _imagej(path, data, dz=2.0, dxy=0.5, unit="um"):
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / dxy, 1 / dxy),
                     metadata={"spacing": dz, "unit": unit, "axes": "ZYX"})
    return path


# --- TIFF ------------------------------------------------------------------------------
def test_tiff_imagej_roundtrip_is_lazy(tmp_path, vol):
    v = read_volume(_imagej(tmp_path / "s.tif", vol))
    assert isinstance(v, Volume) and isinstance(v.data, da.Array)
    assert v.shape == vol.shape and v.spacing_um == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(v.data.compute(), vol)
    np.testing.assert_array_equal(v.data[3, 5:9, 7:12].compute(), vol[3, 5:9, 7:12])


def test_tiff_graph_pickles_for_worker_processes(tmp_path, vol):
    import pickle

    v = read_volume(_imagej(tmp_path / "s.tif", vol))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(v.data))[2].compute(), vol[2])


def test_tiff_micron_unit_and_chunks(tmp_path, vol):
    v = read_volume(_imagej(tmp_path / "s.tiff", vol, dz=1.5, dxy=0.25, unit="micron"), chunks=(2, 10, 10))
    assert v.spacing_um == pytest.approx((1.5, 0.25, 0.25)) and v.data.chunksize == (2, 10, 10)


def test_ome_tiff_physical_size(tmp_path, vol):
    p = tmp_path / "s.ome.tif"
    tifffile.imwrite(p, vol, metadata={"axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeY": 0.4,
                                       "PhysicalSizeX": 0.4, "PhysicalSizeZUnit": "nm"})
    assert read_volume(p).spacing_um == pytest.approx((3e-3, 0.4, 0.4))


def test_tiff_without_spacing_needs_argument(tmp_path, vol):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, vol)
    with pytest.raises(VoxelomeError, match="spacing_um"):
        read_volume(p)
    assert read_volume(p, spacing_um=1.6).spacing_um == (1.6, 1.6, 1.6)


def test_argument_overrides_file_spacing_with_warning(tmp_path, vol):
    p = _imagej(tmp_path / "s.tif", vol)
    with pytest.warns(UserWarning, match="overrides"):
        v = read_volume(p, spacing_um=(4.0, 0.5, 0.5))
    assert v.spacing_um == (4.0, 0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing values: no warning
        read_volume(p, spacing_um=(2.0, 0.5, 0.5))


@pytest.mark.parametrize("kind", ["imagej", "tiled_zlib", "header"])
def test_truncated_tiff_is_a_clear_error(tmp_path, vol, kind):
    src = tmp_path / "full.tif"
    if kind == "tiled_zlib":
        tifffile.imwrite(src, vol, compression="zlib", tile=(16, 16))
    else:
        _imagej(src, vol)
    raw = src.read_bytes()
    cut = {"imagej": len(raw) // 2, "tiled_zlib": len(raw) - 200, "header": 100}[kind]
    bad = tmp_path / "cut.tif"
    bad.write_bytes(raw[:cut])
    with pytest.raises(VoxelomeError, match="corrupt or truncated"):
        read_volume(bad, spacing_um=1)


def test_multichannel_tiff_needs_key(tmp_path):
    p = tmp_path / "mc.tif"
    data = np.arange(4 * 2 * 5 * 6, dtype=np.uint16).reshape(4, 2, 5, 6)
    tifffile.imwrite(p, data, imagej=True, resolution=(2, 2), metadata={"axes": "ZCYX", "spacing": 3, "unit": "um"})
    with pytest.raises(VoxelomeError, match="key="):
        read_volume(p)
    np.testing.assert_array_equal(read_volume(p, key=1).data.compute(), data[:, 1])


# --- OME-Zarr / zarr --------------------------------------------------------------------
def test_ome_zarr_roundtrip(tmp_path, vol):
    p = tmp_path / "v.zarr"
    arr = create_ome_zarr(p, (1,) + vol.shape, chunks_czyx=(1, 4, 8, 8), dtype="uint16",
                          spacing_um_zyx=(2.0, 0.5, 0.5), origin_um_zyx=(10.0, 0.0, -5.0), channel_names=["ct"])
    arr[0] = vol
    v = read_volume(p)
    assert isinstance(v.data, da.Array) and v.data.chunksize == (4, 8, 8)
    assert v.spacing_um == (2.0, 0.5, 0.5) and v.origin_um == (10.0, 0.0, -5.0)
    np.testing.assert_array_equal(v.data.compute(), vol)


def test_ome_zarr_multichannel_pick_by_name(tmp_path, vol):
    p = tmp_path / "mc.zarr"
    data = np.stack([vol, vol + 1]).astype(np.float32)
    write_volume_ome_zarr(p, data, (1.0, 1.0, 1.0), channel_names=["a", "b"], chunks_czyx=(1, 4, 8, 8))
    with pytest.raises(VoxelomeError, match="channels"):
        read_volume(p)
    np.testing.assert_array_equal(read_volume(p, key="b").data.compute(), vol + 1)
    np.testing.assert_array_equal(read_volume(p, key=0).data.compute(), vol)


def test_ome_zarr_millimetre_units(tmp_path, vol):
    import json

    p = tmp_path / "mm.zarr"
    write_volume_ome_zarr(p, vol, (1.0, 1.0, 1.0), chunks_czyx=(1, 8, 8, 8))
    attrs = json.loads((p / ".zattrs").read_text())
    for ax in attrs["multiscales"][0]["axes"][1:]:
        ax["unit"] = "millimeter"
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1, 0.002, 0.001, 0.001]
    (p / ".zattrs").write_text(json.dumps(attrs))
    assert read_volume(p).spacing_um == pytest.approx((2.0, 1.0, 1.0))


@pytest.mark.parametrize("damage", ["group_json", "array_json", "array_missing"])
def test_broken_zarr_metadata_is_a_clear_error(tmp_path, vol, damage):
    p = tmp_path / "v.zarr"
    write_volume_ome_zarr(p, vol, 1.0, chunks_czyx=(1, 4, 8, 8))
    if damage == "group_json":
        (p / ".zattrs").write_text("{not json")
    elif damage == "array_json":
        (p / "0" / ".zarray").write_text("{not json")
    else:
        (p / "0" / ".zarray").unlink()
    with pytest.raises(VoxelomeError, match="corrupt"):
        read_volume(p)


def test_corrupt_chunk_and_missing_chunk(tmp_path, vol):
    p = tmp_path / "v.zarr"
    write_volume_ome_zarr(p, vol.astype(np.float32) + 1, 1.0, chunks_czyx=(1, 4, 8, 8))
    (p / "0" / "0" / "1" / "1" / "1").unlink()  # a missing chunk reads as the fill value (0)
    v = read_volume(p)
    assert float(v.data[4:6, 8:16, 8:16].max().compute()) == 0.0
    (p / "0" / "0" / "1" / "0" / "0").write_bytes(b"garbage" * 20)
    with pytest.raises(VoxelomeError, match="corrupt or truncated"):
        read_volume(p).data.compute()


def test_plain_zarr_array_needs_spacing(tmp_path, vol):
    import zarr

    p = tmp_path / "plain.zarr"
    z = zarr.open_array(str(p), mode="w", shape=vol.shape, chunks=(2, 10, 10), dtype=vol.dtype, zarr_format=2)
    z[:] = vol
    with pytest.raises(VoxelomeError, match="spacing_um"):
        read_volume(p)
    v = read_volume(p, spacing_um=(1, 2, 2))
    assert v.data.chunksize == (2, 10, 10)
    np.testing.assert_array_equal(v.data.compute(), vol)


# --- NIfTI -----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_mm_to_um_and_transpose(tmp_path, suffix):
    nib = pytest.importorskip("nibabel")
    xyz = np.random.default_rng(1).random((7, 9, 11)).astype(np.float32)  # (x, y, z)
    img = nib.Nifti1Image(xyz, np.diag([0.002, 0.003, 0.004, 1.0]))
    img.header.set_xyzt_units("mm")
    p = tmp_path / f"v{suffix}"
    nib.save(img, p)
    v = read_volume(p)
    assert v.shape == (11, 9, 7) and v.spacing_um == pytest.approx((4.0, 3.0, 2.0))
    assert isinstance(v.data, da.Array)
    np.testing.assert_allclose(v.data.compute(), xyz.transpose(2, 1, 0))


def test_nifti_unknown_unit_warns_and_assumes_mm(tmp_path):
    nib = pytest.importorskip("nibabel")
    p = tmp_path / "u.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), p)
    with pytest.warns(UserWarning, match="millimetres"):
        assert read_volume(p).spacing_um == (1000.0, 1000.0, 1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_volume(p, spacing_um=5).spacing_um == (5.0, 5.0, 5.0)


def test_truncated_nifti(tmp_path):
    nib = pytest.importorskip("nibabel")
    p = tmp_path / "t.nii"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), p)
    p.write_bytes(p.read_bytes()[:5000])
    with pytest.raises(VoxelomeError, match="corrupt or truncated"):
        read_volume(p, spacing_um=1)


# --- NumPy -----------------------------------------------------------------------------
def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_npy_is_memory_mapped_not_loaded(tmp_path):
    p = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(64, 256, 256))  # 16 MiB
    big[10, 3:5, 4:6] = 7.0
    big.flush()
    del big

    def use():
        v = read_volume(p, spacing_um=2.0, chunks=(8, 64, 64))
        assert isinstance(v.data, da.Array)
        assert float(v.data[10, 3:5, 4:6].sum().compute()) == 28.0

    assert _peak_mib(use) < 4.0  # the 16 MiB file is never read whole


def test_npz_key_spacing_entry_and_errors(tmp_path, vol):
    p = tmp_path / "v.npz"
    np.savez(p, image=vol, labels=vol > 500, spacing_um=np.array([3.0, 1.0, 1.0]))
    with pytest.raises(VoxelomeError, match="labels"):
        read_volume(p)
    with pytest.raises(VoxelomeError, match="Did you mean 'image'"):
        read_volume(p, key="imag")
    v = read_volume(p, key="image")
    assert v.spacing_um == (3.0, 1.0, 1.0)
    np.testing.assert_array_equal(v.data.compute(), vol)
    q = tmp_path / "one.npz"
    np.savez_compressed(q, vol)
    np.testing.assert_array_equal(read_volume(q, spacing_um=1).data.compute(), vol)


def test_uncompressed_npz_member_is_mapped(tmp_path):
    p = tmp_path / "big.npz"
    np.savez(p, vol=np.ones((64, 256, 256), np.float32), spacing=np.array(1.0))
    assert _peak_mib(lambda: read_volume(p).data[0, :8, :8].compute()) < 4.0


@pytest.mark.shared_data
def test_real_ct_stent_npz():
    p = SHARED / "ct_stent_imageio" / "stent.npz"
    if not p.exists():
        pytest.skip(f"shared data not present at {p}")
    v = read_volume(p, spacing_um=1.0)
    assert v.shape == (256, 128, 128) and v.data.dtype == np.int16


# --- user errors -----------------------------------------------------------------------
def test_missing_file_did_you_mean(tmp_path, vol):
    np.save(tmp_path / "scan_01.npy", vol)
    with pytest.raises(VoxelomeError, match="Did you mean 'scan_01.npy'"):
        read_volume(tmp_path / "scan_1.npy", spacing_um=1)


def test_unknown_suffix_and_plain_folder(tmp_path):
    (tmp_path / "v.mrc").write_bytes(b"\0" * 10)
    with pytest.raises(VoxelomeError, match=r"Supported:.*\.nii"):
        read_volume(tmp_path / "v.mrc")
    (tmp_path / "folder").mkdir()
    with pytest.raises(VoxelomeError, match="neither a zarr store.*nor a folder of image slices"):
        read_volume(tmp_path / "folder")


def test_not_3d(tmp_path):
    np.save(tmp_path / "img.npy", np.zeros((10, 12)))
    with pytest.raises(VoxelomeError, match="3 axes"):
        read_volume(tmp_path / "img.npy", spacing_um=1)


# --- a folder of 2D TIFF slices (micro-CT reconstructions) -----------------------------------------------------
def _slices(folder, vol, names=None, dxy=0.5):
    folder.mkdir()
    names = names or [f"rec_{k}.tif" for k in range(len(vol))]  # rec_10 after rec_9: natural order, not text order
    for name, image in zip(names, vol):
        tifffile.imwrite(folder / name, image, resolution=(1 / dxy, 1 / dxy), resolutionunit="MICROMETER")
    return folder


def test_tiff_slice_folder_in_natural_order_is_lazy(tmp_path):
    vol = np.random.default_rng(1).integers(0, 4000, size=(12, 20, 30)).astype(np.uint16)
    folder = _slices(tmp_path / "recon", vol)
    (folder / "notes.txt").write_text("scanner log")  # other files are ignored
    with pytest.raises(VoxelomeError, match=r"found dy=0.5 µm, dx=0.5 µm.*slice distance.*spacing_um"):
        read_volume(folder)
    v = read_volume(folder, spacing_um=(2.0, 0.5, 0.5))
    assert isinstance(v.data, da.Array) and v.data.chunksize == (1, 20, 30)
    assert v.shape == vol.shape and v.spacing_um == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(v.data.compute(), vol)  # rec_0 … rec_11 in numeric order
    np.testing.assert_array_equal(v.data[10, 3:7].compute(), vol[10, 3:7])


def test_tiff_slice_folder_errors_name_the_file(tmp_path, vol):
    folder = _slices(tmp_path / "mixed", vol)
    tifffile.imwrite(folder / "rec_9.tif", vol[0, :10])  # one slice of another size
    with pytest.raises(VoxelomeError, match=r"rec_9.tif' is a uint16 image of shape \(10, 30\)"):
        read_volume(folder, spacing_um=1)
    one = tmp_path / "one"
    one.mkdir()
    tifffile.imwrite(one / "a.tif", vol[0])
    with pytest.raises(VoxelomeError, match="1 image slice"):
        read_volume(one, spacing_um=1)
    bad = _slices(tmp_path / "bad", vol)
    (bad / "rec_3.tif").write_bytes((bad / "rec_3.tif").read_bytes()[:50])  # truncated header
    with pytest.raises(VoxelomeError, match="rec_3.tif' is not a readable image slice"):
        read_volume(bad, spacing_um=1)


def test_png_and_bmp_slice_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    grey8, grey16 = rng.integers(0, 256, (3, 9, 11), dtype=np.uint8), rng.integers(0, 65535, (3, 9, 11)).astype(np.uint16)
    for kind, vol in (("bmp", grey8), ("png", grey16), ("png8", grey8)):
        folder = tmp_path / kind
        folder.mkdir()
        for k, image in enumerate(vol):
            Image.fromarray(image).save(folder / f"s{k}.{kind[:3]}")
        v = read_volume(folder, spacing_um=5)
        assert v.data.dtype == vol.dtype and v.spacing_um == (5.0, 5.0, 5.0)
        np.testing.assert_array_equal(v.data.compute(), vol)
    (tmp_path / "bmp" / "thumb.png").write_bytes((tmp_path / "png8" / "s0.png").read_bytes())
    with pytest.raises(VoxelomeError, match=r"mixes \['.bmp', '.png'\] slices"):
        read_volume(tmp_path / "bmp", spacing_um=5)
    colour = tmp_path / "colour"
    colour.mkdir()
    for k in range(2):
        Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(colour / f"c{k}.png")
    with pytest.raises(VoxelomeError, match="RGB image; a slice series needs grey-level slices"):
        read_volume(colour, spacing_um=5)
    tifs = _slices(tmp_path / "tifs", grey16)
    Image.fromarray(grey8[0]).save(tifs / "preview.png")  # a preview beside TIFF slices is not a slice
    np.testing.assert_array_equal(read_volume(tifs, spacing_um=(5, 0.5, 0.5)).data.compute(), grey16)


# --- MetaImage / NRRD (SimpleITK) -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mha", ".mhd", ".nrrd"])
def test_itk_volume_is_read_by_slabs_with_mm_spacing(tmp_path, vol, suffix):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)  # numpy (z, y, x) → ITK (x, y, z)
    img.SetSpacing((0.0005, 0.0005, 0.002))  # mm
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    with pytest.warns(UserWarning, match="assuming millimetres"):
        v = read_volume(tmp_path / f"v{suffix}", chunks=(2, 20, 30))
    assert v.shape == vol.shape and v.spacing_um == pytest.approx((2.0, 0.5, 0.5))
    assert v.data.chunksize == (2, 20, 30) and v.data.dtype == vol.dtype
    np.testing.assert_array_equal(v.data.compute(), vol)
    np.testing.assert_array_equal(v.data[3, 5:9, 7:12].compute(), vol[3, 5:9, 7:12])
    import pickle  # the graph travels to dask worker processes: it holds the path, not the voxels

    assert len(pickle.dumps(v.data)) < vol.nbytes
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(v.data))[4].compute(), vol[4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the spacing given, no guess and no warning
        assert read_volume(tmp_path / f"v{suffix}", spacing_um=(2, 0.5, 0.5)).spacing_um == (2.0, 0.5, 0.5)


def test_itk_one_volume_4d_file(tmp_path, vol):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(vol[None], isVector=False), str(tmp_path / "t.mha"))  # (x, y, z, t=1)
    v = read_volume(tmp_path / "t.mha", spacing_um=1)
    assert v.shape == vol.shape
    np.testing.assert_array_equal(np.asarray(v.data[2, 3:7]), vol[2, 3:7])


def test_itk_errors(tmp_path, vol):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "v.mha"))
    data = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[:len(data) // 2])  # truncated voxel data
    with pytest.raises(VoxelomeError, match="cut.mha' is not a readable ITK image"):
        read_volume(tmp_path / "cut.mha", spacing_um=1)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(tmp_path / "rgb.mha"))
    with pytest.raises(VoxelomeError, match="3 components per voxel"):
        read_volume(tmp_path / "rgb.mha", spacing_um=1)


def test_nrrd_space_units_are_honoured(tmp_path, vol):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    raw = (tmp_path / "v.nrrd").read_bytes()
    at = raw.index(b"kinds:")
    (tmp_path / "um.nrrd").write_bytes(raw[:at] + b'space units: "microns" "microns" "microns"\n' + raw[at:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unit is stated: no guess
        v = read_volume(tmp_path / "um.nrrd")
    assert v.spacing_um == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(v.data.compute(), vol)
