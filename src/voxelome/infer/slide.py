"""Whole-slide dense prediction: blended tiles on one global grid, block-wise, into a 2D OME-Zarr ``(c, y, x)``.

The 2D analogue of :mod:`voxelome.infer.sliding_window` (whose windows are single-channel 3D): tiles lie
on ONE global grid over the image (reaching a mirrored margin beyond its edges); to fill an output
block, every tile touching it is predicted and blended into the block only, in global order. So
computing the map block by block gives bit-for-bit the result of computing it at once, and with a
point-wise predictor the tiled map equals a direct forward pass (``tests/test_dense2d_slide.py``).
Memory is bounded by one block plus its tiles; the map is written chunk by chunk to a multiscale
NGFF 0.4 store with axes ``c, y, x`` in µm (napari-ome-zarr reads it).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from itertools import product
from pathlib import Path

import numpy as np

from voxelome.errors import VoxelomeError
from voxelome.infer.sliding_window import blend_weights
from voxelome.io.atomic import atomic_write_json
from voxelome.io.omezarr import attrs_2d


def tile_starts(size: int, tile: int, stride: int, overlap: float, margin: int) -> np.ndarray:
    """Global tile starts (input px, negative inside the low margin) along one axis of ``size`` px."""
    out = -(-size // stride)
    padded = max(out * stride + 2 * margin, tile)
    step = max(stride, int(tile * (1 - overlap)) // stride * stride)
    s = list(range(0, padded - tile + 1, step))
    if s[-1] != padded - tile:
        s.append(padded - tile)
    return np.asarray(s) - margin


def _read_mirrored(image, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """``image[y0:y0+h, x0:x0+w]`` (any array-like, (y, x, c)), mirrored beyond the image edges."""
    H, W = image.shape[:2]
    ly, lx = max(y0, 0), max(x0, 0)
    hy, hx = min(y0 + h, H), min(x0 + w, W)
    block = np.asarray(image[ly:hy, lx:hx])
    pad = [(ly - y0, y0 + h - hy), (lx - x0, x0 + w - hx), (0, 0)]
    if any(p != (0, 0) for p in pad):
        block = np.pad(block, pad, mode="symmetric")
    return block


def predict_slide(image, predictor: Callable[[np.ndarray], np.ndarray], *, tile: int, stride: int, n_channels: int,
                  overlap: float = 0.25, blend: str = "gaussian", margin: int | None = None,
                  out_region: tuple[slice, slice] | None = None, batch_size: int = 4) -> np.ndarray:
    """Dense map of (a region of) an image from blended overlapping tiles.

    Parameters
    ----------
    image : array-like, shape (y, x, 3)
        Image at the model's working resolution (numpy, zarr or dask; only the needed part is read).
    predictor : callable
        ``(B, 3, tile, tile) float32 RGB in [0, 1] → (B, n_channels, tile/stride, tile/stride)``.
    tile : int
        Tile side (input px), a multiple of ``stride``.
    stride : int
        Input pixels per output pixel.
    n_channels : int
        Output channels.
    overlap : float
        Fraction of a tile shared with its neighbour, in [0, 1).
    blend : {'gaussian', 'constant'}
        Tile weights (Gaussian fades out tile borders, where padding makes predictions least reliable).
    margin : int, optional
        Context (input px, multiple of ``stride``) the tiles reach beyond the image (mirrored).
        Default a quarter tile.
    out_region : (slice, slice), optional
        Region of the output grid ``(ceil(y/stride), ceil(x/stride))`` to compute; default all of it.
    batch_size : int
        Tiles per predictor call.

    Returns
    -------
    ndarray, shape (n_channels, *region shape), float32
    """
    H, W = (int(s) for s in image.shape[:2])
    if tile % stride:
        raise VoxelomeError(f"tile={tile} must be a multiple of the output stride {stride}.")
    if not 0 <= overlap < 1:
        raise VoxelomeError(f"overlap={overlap} must lie in [0, 1).")
    margin = tile // 4 // stride * stride if margin is None else int(margin)
    out_shape = (-(-H // stride), -(-W // stride))
    if out_region is None:
        out_region = (slice(0, out_shape[0]), slice(0, out_shape[1]))
    out_region = tuple(slice(max(sl.start or 0, 0), min(sl.stop, o)) for sl, o in zip(out_region, out_shape))
    r0 = np.array([sl.start for sl in out_region])
    rshape = tuple(max(int(sl.stop - sl.start), 0) for sl in out_region)
    to = tile // stride
    per_axis = []
    for ax, (size, sl) in enumerate(zip((H, W), out_region)):
        s = tile_starts(size, tile, stride, overlap, margin)
        per_axis.append(s[((s + tile) // stride > sl.start) & (s // stride < sl.stop)])
    starts = list(product(*per_axis))
    num = np.zeros((n_channels, *rshape), np.float64)
    den = np.zeros(rshape, np.float64)
    if not starts or 0 in rshape:
        return num.astype(np.float32)
    weights = blend_weights((1, to, to), blend)[0]
    lo = np.min(starts, axis=0)
    hi = np.max(starts, axis=0) + tile
    block = _read_mirrored(image, int(lo[0]), int(lo[1]), int(hi[0] - lo[0]), int(hi[1] - lo[1]))
    if block.shape[-1] != 3:
        raise VoxelomeError(f"image has {block.shape[-1]} channels; an RGB image (y, x, 3) is needed.")
    scale = 1 / 255.0 if block.dtype == np.uint8 else 1.0
    for i in range(0, len(starts), batch_size):
        bs = starts[i:i + batch_size]
        x = np.stack([block[s[0] - lo[0]:s[0] - lo[0] + tile, s[1] - lo[1]:s[1] - lo[1] + tile] for s in bs])
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(scale)
        y = np.asarray(predictor(x), dtype=np.float64)
        if y.shape[1:] != (n_channels, to, to):
            raise VoxelomeError(f"predictor returned {y.shape[1:]}; expected {(n_channels, to, to)} per tile.")
        for s, pred in zip(bs, y):
            o0 = np.asarray(s) // stride
            a, b = np.maximum(o0, r0), np.minimum(o0 + to, r0 + rshape)
            if (b <= a).any():
                continue
            src = tuple(slice(p - q, r - q) for p, q, r in zip(a, o0, b))
            dst = tuple(slice(p - q, r - q) for p, q, r in zip(a, r0, b))
            num[(slice(None), *dst)] += pred[(slice(None), *src)] * weights[src]
            den[dst] += weights[src]
    return (num / den).astype(np.float32)


def write_slide_map(path, image, predictor, *, tile: int, stride: int, channel_names, pixel_size_um: float,
                    overlap: float = 0.25, blend: str = "gaussian", chunk: int = 256, batch_size: int = 4,
                    overwrite: bool = False, extra_attrs: dict | None = None, progress: bool = False) -> Path:
    """Predict a whole slide block by block into a multiscale OME-Zarr ``(c, y, x)``.

    Parameters
    ----------
    path : path
        Output store folder.
    image : array-like, shape (y, x, 3)
        Image at the working resolution.
    predictor, tile, stride, overlap, blend, batch_size : see :func:`predict_slide`.
    channel_names : list of str
        One name per output channel (genes).
    pixel_size_um : float
        Working µm per input pixel; the map's pixel is ``pixel_size_um · stride``.
    chunk : int
        Output block side (map px); memory holds one block and its tiles.
    overwrite : bool
        Replace an existing store.
    extra_attrs : dict, optional
        Metadata added to the group attributes (e.g. the model run and the map's unit).
    """
    import zarr
    from numcodecs import Blosc

    from voxelome.io.omezarr import _downsample_block

    path = Path(path)
    if path.exists():
        if not overwrite:
            raise VoxelomeError(f"'{path}' exists; pass overwrite=True (CLI --overwrite) or choose another path.")
        shutil.rmtree(path)
    names = [str(n) for n in channel_names]
    H, W = image.shape[:2]
    out = (-(-H // stride), -(-W // stride))
    comp = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    ch = (min(len(names), 16), min(chunk, out[0]), min(chunk, out[1]))
    arr = group.create_array("0", shape=(len(names), *out), chunks=ch, dtype="float32", fill_value=0.0,
                             compressors=comp, chunk_key_encoding={"name": "v2", "separator": "/"})
    blocks = list(product(range(0, out[0], ch[1]), range(0, out[1], ch[2])))
    it = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc="slide")
    for by, bx in it:
        region = (slice(by, min(by + ch[1], out[0])), slice(bx, min(bx + ch[2], out[1])))
        arr[(slice(None), *region)] = predict_slide(image, predictor, tile=tile, stride=stride, n_channels=len(names),
                                                    overlap=overlap, blend=blend, out_region=region,
                                                    batch_size=batch_size)
    spacing = (float(pixel_size_um) * stride,) * 2
    factors, src = [1], arr
    while min(src.shape[1:]) >= 64:  # 2× mean levels, block by block (memory: one block)
        shape = (src.shape[0], -(-src.shape[1] // 2), -(-src.shape[2] // 2))
        dst = group.create_array(str(len(factors)), shape=shape, chunks=(ch[0], *[min(c, s) for c, s in zip(ch[1:], shape[1:])]),
                                 dtype="float32", fill_value=0.0, compressors=comp,
                                 chunk_key_encoding={"name": "v2", "separator": "/"})
        for by, bx in product(range(0, shape[1], ch[1]), range(0, shape[2], ch[2])):
            blk = np.asarray(src[:, 2 * by:2 * (by + ch[1]), 2 * bx:2 * (bx + ch[2])])
            lvl = _downsample_block(blk, (1, 2, 2), np.dtype(np.float32))
            dst[:, by:by + lvl.shape[1], bx:bx + lvl.shape[2]] = lvl
        src = dst
        factors.append(factors[-1] * 2)
    last = np.asarray(src[:])
    windows = [(float(np.nanmin(c)), float(np.nanmax(c))) for c in last]
    # map pixel (0, 0) covers input pixels [0, stride)², whose centre lies (stride − 1)/2 input pixels from
    # the centre of input pixel (0, 0) — the image's origin
    centre = (stride - 1) / 2 * float(pixel_size_um)
    attrs = attrs_2d(path.name, spacing, names, factors, windows, origin_yx=(centre, centre))
    attrs.update(extra_attrs or {})
    atomic_write_json(path / ".zattrs", attrs)
    return path


def read_slide_map(path, level: int = 0):
    """Read a ``(c, y, x)`` store written by :func:`write_slide_map`.

    Returns
    -------
    data : zarr.Array, shape (c, y, x)
    pixel_size_um : (float, float)
        ``(dy, dx)`` of that level.
    channel_names : list of str
    """
    import json

    import zarr

    path = Path(path)
    if not (path / ".zattrs").exists():
        raise VoxelomeError(f"'{path}' is not a 2D OME-Zarr map (no .zattrs); write it with `voxelome dense2d predict`.")
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    if [a["name"] for a in ms["axes"]] != ["c", "y", "x"]:
        raise VoxelomeError(f"'{path}' has axes {[a['name'] for a in ms['axes']]}; expected (c, y, x).")
    ds = ms["datasets"][level]
    scale = next(t["scale"] for t in ds["coordinateTransformations"] if t["type"] == "scale")
    names = [c["label"] for c in attrs.get("omero", {}).get("channels", [])]
    return zarr.open_array(str(path / ds["path"]), mode="r"), (scale[1], scale[2]), names



def write_stack_map(path, stack, predictor, *, tile: int, stride: int, channel_names, pixel_size_um: float,
                    section_spacing_um: float, overlap: float = 0.25, blend: str = "gaussian", chunk: int = 256,
                    batch_size: int = 4, overwrite: bool = False, origin_um_zyx=(0.0, 0.0, 0.0),
                    extra_attrs: dict | None = None, progress: bool = False) -> Path:
    """A registered image stack → 3D expression volume: each section's dense map, slice-wise, into ``(c, z, y, x)``.

    Parameters
    ----------
    stack : array-like, shape (z, y, x, 3)
        Registered RGB sections at the model's working resolution (e.g. the her2st C2–C6 H&E stack after
        section-to-section registration), section ``k`` at ``z = k · section_spacing_um``.
    section_spacing_um : float
        Distance between consecutive sections (µm): the volume's z spacing.
    origin_um_zyx : tuple of 3 float
        Position (µm) of the centre of the stack's voxel ``(0, 0, 0)`` (e.g. :attr:`RGBStack.origin_um_zyx`);
        the map's origin follows from it (a map pixel is centred on its ``stride × stride`` input pixels).
    Other parameters : see :func:`write_slide_map`.

    Returns
    -------
    Path of a multiscale OME-Zarr ``(c, z, y, x)`` in µm (:mod:`voxelome.io.omezarr`), written section by
    section and block by block.
    """
    from voxelome.io.omezarr import build_pyramid, create_ome_zarr

    if getattr(stack, "ndim", 0) != 4 or stack.shape[-1] != 3:
        raise VoxelomeError(f"stack has shape {getattr(stack, 'shape', None)}; expected (z, y, x, 3) RGB sections.")
    Z, H, W = (int(s) for s in stack.shape[:3])
    out = (-(-H // stride), -(-W // stride))
    names = [str(n) for n in channel_names]
    path = Path(path)
    if path.exists() and not overwrite:
        raise VoxelomeError(f"'{path}' exists; pass overwrite=True (CLI --overwrite) or choose another path.")
    shift = (stride - 1) / 2 * float(pixel_size_um)
    oz, oy, ox = (float(v) for v in origin_um_zyx)
    arr = create_ome_zarr(path, (len(names), Z, *out), chunks_czyx=(min(len(names), 16), 1, chunk, chunk),
                          spacing_um_zyx=(float(section_spacing_um), float(pixel_size_um) * stride,
                                          float(pixel_size_um) * stride), origin_um_zyx=(oz, oy + shift, ox + shift),
                          channel_names=names, overwrite=overwrite)
    zs = range(Z)
    if progress:
        from tqdm.auto import tqdm

        zs = tqdm(zs, desc="sections")
    for z in zs:
        section = np.asarray(stack[z])
        for by, bx in product(range(0, out[0], chunk), range(0, out[1], chunk)):
            region = (slice(by, min(by + chunk, out[0])), slice(bx, min(bx + chunk, out[1])))
            arr[(slice(None), z, *region)] = predict_slide(section, predictor, tile=tile, stride=stride,
                                                           n_channels=len(names), overlap=overlap, blend=blend,
                                                           out_region=region, batch_size=batch_size)
    build_pyramid(path)
    if extra_attrs:
        import json

        attrs = json.loads((path / ".zattrs").read_text())
        attrs.update(extra_attrs)
        atomic_write_json(path / ".zattrs", attrs)
    return path


class RGBStack:
    """A registered RGB stack stored as OME-Zarr ``(c=3, z, y, x)``, read lazily as ``(z, y, x, 3)`` sections
    resampled to a working pixel size (what :func:`write_stack_map` takes).

    ``voxelome register stack --images … --zarr-out`` writes such a store (uint8, µm scale and translation).
    Only the section asked for is read and resampled (box filter when shrinking, bilinear when enlarging).

    Parameters
    ----------
    path : path
        OME-Zarr store with 3 channels (R, G, B), uint8 (or float in [0, 1]).
    pixel_size_um : float, optional
        Working µm per pixel of the returned sections; default the store's own.

    Attributes
    ----------
    shape : (z, y, x, 3)
    pixel_size_um : float
        Exact working µm per pixel (mean of y and x after rounding the size).
    section_spacing_um : float
        The store's z spacing.
    origin_um_zyx : tuple of 3 float
        Centre of working voxel ``(0, 0, 0)`` in the store's µm frame.
    store_pixel_size_um : (float, float)
        The store's ``(dy, dx)``.
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, path, pixel_size_um: float | None = None):
        from voxelome.io.omezarr import read_ome_zarr
        from voxelome.io.volumes import read_volume

        data, spacing, _ = read_ome_zarr(path)
        if data.shape[0] != 3:
            raise VoxelomeError(f"'{path}' has {data.shape[0]} channel(s); an RGB stack (c=3, z, y, x) is needed, e.g. "
                                "from `voxelome register stack --images … --zarr-out`.")
        origin = read_volume(path, key=0).origin_um
        dz, dy, dx = (float(v) for v in spacing)
        target = float(pixel_size_um) if pixel_size_um is not None else (dy + dx) / 2
        if not target > 0:
            raise VoxelomeError(f"pixel_size_um={pixel_size_um!r} must be > 0.")
        Z, H, W = (int(v) for v in data.shape[1:])
        h, w = max(1, int(round(H * dy / target))), max(1, int(round(W * dx / target)))
        py, px = H * dy / h, W * dx / w
        self.data, self.path = data, Path(path)
        self.shape = (Z, h, w, 3)
        self.pixel_size_um = (py + px) / 2
        self.section_spacing_um = dz
        self.store_pixel_size_um = (dy, dx)
        self.origin_um_zyx = (float(origin[0]), float(origin[1]) + (py - dy) / 2, float(origin[2]) + (px - dx) / 2)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, z) -> np.ndarray:
        """Section ``z`` as ``(y, x, 3)`` uint8 at the working pixel size."""
        from PIL import Image

        if not isinstance(z, (int, np.integer)) or not -self.shape[0] <= z < self.shape[0]:
            raise VoxelomeError(f"section index {z!r} is not one of the {self.shape[0]} sections.")
        sec = np.moveaxis(np.asarray(self.data[:, int(z)]), 0, -1)
        if sec.dtype != np.uint8:
            sec = np.clip(np.asarray(sec, float) * (255.0 if np.nanmax(sec) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        h, w = self.shape[1:3]
        if sec.shape[:2] == (h, w):
            return np.ascontiguousarray(sec)
        shrink = h < sec.shape[0]
        img = Image.fromarray(np.ascontiguousarray(sec)).resize((w, h), Image.BOX if shrink else Image.BILINEAR)
        return np.asarray(img, np.uint8)
