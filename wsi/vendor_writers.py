"""Write one image as the slide files scanners and converters produce, for the format matrix's tests and benchmarks.

Each writer puts the same pixels in a real file of a vendor's layout, with the metadata OpenSlide 4 and
tiffslide read (the vendor's description, XML and private tags, as their readers parse them: see
``openslide/src/openslide-vendor-*.c``). Pixels go in as whole levels (``pyramid``): these files are
test- and benchmark-sized, never a 100,000-px slide (``wsi.tiff_writer`` streams those).

Formats: ``svs`` (Aperio, JPEG tiles), ``svs-j2k`` (Aperio with lossless JPEG 2000 tiles, the TCGA layout),
``ome-tiff`` (SubIFD pyramid, mpp in OME-XML), ``philips-tiff``, ``ventana`` (Ventana TIFF/BIF
without stitching overlaps), ``leica-scn`` (the scan placed on the collection's glass, with a macro),
``ndpi`` (Hamamatsu: one JPEG per level, restart markers for random access), ``bigtiff`` (generic
pyramidal BigTIFF), ``flat-tiff`` (one tiled level, no pyramid), ``dicom`` (DICOM-WSI through
wsidicomizer, a test dependency).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

TILE = 256


def pyramid(base: np.ndarray, downsamples: tuple[int, ...] = (1, 4, 16)) -> list[np.ndarray]:
    """``base`` and its area-averaged reductions by each downsample (sizes rounded down, as scanners do)."""
    import cv2

    h, w = base.shape[:2]
    return [base if d == 1 else cv2.resize(base, (w // d, h // d), interpolation=cv2.INTER_AREA) for d in downsamples]


def _tiles(image: np.ndarray, tile: int = TILE) -> Iterator[np.ndarray]:
    """Tiles of ``image`` (white-padded at the edges) in row-major order."""
    h, w = image.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block


def _padded(image: np.ndarray, tile: int = TILE) -> np.ndarray:
    """``image`` grown to whole tiles with white, as Philips stores its levels."""
    h, w = image.shape[:2]
    out = np.full((-(-h // tile) * tile, -(-w // tile) * tile, 3), 255, np.uint8)
    out[:h, :w] = image
    return out


JPEG = {"compression": "jpeg", "compressionargs": {"level": 90}}


def write_svs(path: Path, levels: list[np.ndarray], mpp: float, *, j2k: bool = False) -> Path:
    """Aperio SVS: level 0, a stripped thumbnail, the other levels; ``j2k``: tiles in Aperio's RGB JPEG 2000 (33005),
    lossless, so a J2K file holds exactly the pixels it was given (TCGA's are lossy: the reading is the same)."""
    h, w = levels[0].shape[:2]
    codec = {"compression": 33005} if j2k else JPEG
    name = "J2K/KDU Q=100" if j2k else "JPEG/RGB Q=90"
    head = "Aperio Image Library v12.0.15"
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            lh, lw = level.shape[:2]
            size = f" -> {lw}x{lh}" if index else ""
            desc = f"{head}\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}){size} {name}|AppMag = {10 / mpp:g}|MPP = {mpp:.4f}"
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      metadata=None, description=desc, **codec)
            if index == 0:
                thumb = levels[-1]
                tif.write(thumb, photometric="rgb", metadata=None, description=f"{head}\r\n{w}x{h} -> "
                          f"{thumb.shape[1]}x{thumb.shape[0]}", **JPEG)
    return path


def write_generic(path: Path, levels: list[np.ndarray], mpp: float, *, bigtiff: bool = False) -> Path:
    """A plain tiled TIFF pyramid (one level: a flat TIFF), the scale only in its resolution tags (pixels per cm)."""
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for index, level in enumerate(levels):
            ds = levels[0].shape[1] / level.shape[1]
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      metadata=None, resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER",
                      subfiletype=1 if index else 0, **JPEG)
    return path


def write_ome(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """OME-TIFF: level 0 with the others in its SubIFDs, the mpp only in the OME-XML (in nm, to test the unit)."""
    meta = {"axes": "YXS", "PhysicalSizeX": mpp * 1000, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": mpp * 1000,
            "PhysicalSizeYUnit": "nm"}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(_tiles(levels[0]), shape=levels[0].shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                  subifds=len(levels) - 1, metadata=meta, **JPEG)
        for level in levels[1:]:
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      subfiletype=1, metadata=None, **JPEG)
    return path


def _philips_xml(levels: list[np.ndarray], mpp: float) -> str:
    """The DPUfsImport XML OpenSlide reads: one WSI image, its pixel spacing per level in mm ("row" "column")."""
    def attribute(name: str, value: str) -> str:
        return f'<Attribute Name="{name}" Group="0x0000" Element="0x0000" PMSVR="IString">{html.escape(value)}</Attribute>'

    spacings = []
    for level in levels:
        mm = mpp * levels[0].shape[1] / level.shape[1] / 1000
        spacings.append('<DataObject ObjectType="PixelDataRepresentation">'
                        + attribute("DICOM_PIXEL_SPACING", f'"{mm:.9g}" "{mm:.9g}"') + "</DataObject>")
    wsi = ('<DataObject ObjectType="DPScannedImage">' + attribute("PIM_DP_IMAGE_TYPE", "WSI")
           + attribute("DICOM_PIXEL_SPACING", f'"{mpp / 1000:.9g}" "{mpp / 1000:.9g}"')
           + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" PMSVR="IDataObjectArray">'
           + "<Array>" + "".join(spacings) + "</Array></Attribute></DataObject>")
    return ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
            + attribute("DICOM_MANUFACTURER", "PHILIPS")
            + attribute("DICOM_DERIVATION_DESCRIPTION", f"tiff-useBigTIFF=1-levels={round(10 / mpp)},10-quality=90")
            + '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
            + wsi + "</Array></Attribute></DataObject>")


def write_philips(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Philips TIFF: levels padded to whole tiles, the XML in the first description, Software "Philips"."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            padded = _padded(level)
            tif.write(_tiles(padded), shape=padded.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      metadata=None, software="Philips DP v1.0", subfiletype=1 if index else 0,
                      description=_philips_xml(levels, mpp) if index == 0 else "", **JPEG)
    return path


def write_ventana(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Ventana TIFF: a label page carrying the iScan XMP (magnification, ScanRes in µm/px), then one tiled page per
    level described as ``level=N mag=M`` (the layout OpenSlide reads as Ventana without stitching overlaps)."""
    magnification = 10 / mpp
    xmp = (f'<?xml version="1.0" encoding="utf-8"?><iScan Magnification="{magnification:g}" ScanRes="{mpp:g}" '
           f'ScannerModel="VENTANA DP 200" UnitNumber="0" />').encode()
    label = np.full((128, 256, 3), 230, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(label, photometric="rgb", metadata=None, description="Label_Image",
                  extratags=[(700, 1, len(xmp), xmp, True)], **JPEG)
        for index, level in enumerate(levels):
            mag = magnification * level.shape[1] / levels[0].shape[1]
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      metadata=None, description=f"level={index} mag={mag:g} quality=90", **JPEG)
    return path


LEICA_NS = "http://www.leica-microsystems.com/scn/2010/10/01"


def write_leica(path: Path, levels: list[np.ndarray], mpp: float, margin: int = 512) -> Path:
    """Leica SCN: the scan is one image placed ``margin`` level-0 px into the collection (the glass), whose size
    and offsets are in nm; a macro image covers the whole collection. Returns the path; the scan's level-0
    origin in the slide's coordinates is (margin, margin)."""
    h, w = levels[0].shape[:2]
    nm = mpp * 1000
    coll_w, coll_h = round((w + 2 * margin) * nm), round((h + 2 * margin) * nm)
    macro = np.full((max(1, (h + 2 * margin) // 64), max(1, (w + 2 * margin) // 64), 3), 235, np.uint8)

    def image(name: str, dims: list[tuple[int, int, int]], view: tuple[int, int, int, int], objective: str) -> str:
        dimensions = "".join(f'<dimension sizeX="{dw}" sizeY="{dh}" r="{r}" ifd="{ifd}"/>' for r, (dw, dh, ifd) in enumerate(dims))
        return (f'<image name="{name}" uuid="urn:uuid:{name}"><creationDate>2026-01-01T00:00:00.00Z</creationDate>'
                f'<device model="Leica SCN400;Leica SCN" version="1.5.1.10864 2012/05/10 13:29:07;1.5.1.10804"/>'
                f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{dimensions}</pixels>'
                f'<view sizeX="{view[0]}" sizeY="{view[1]}" offsetX="{view[2]}" offsetY="{view[3]}" spacingZ="0"/>'
                f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
                "<illuminationSettings><numericalAperture>0.4</numericalAperture>"
                "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings></image>")

    main_dims = [(lv.shape[1], lv.shape[0], i) for i, lv in enumerate(levels)]
    xml = (f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{LEICA_NS}"><collection name="slide" '
           f'uuid="urn:uuid:collection" sizeX="{coll_w}" sizeY="{coll_h}"><barcode>0</barcode>'
           + image("macro", [(macro.shape[1], macro.shape[0], len(levels))], (coll_w, coll_h, 0, 0), "1")
           + image("main", main_dims, (round(w * nm), round(h * nm), round(margin * nm), round(margin * nm)),
                   f"{10 / mpp:g}")
           + "</collection></scn>")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            ds = levels[0].shape[1] / level.shape[1]
            tif.write(_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      metadata=None, description=xml if index == 0 else None, subfiletype=1 if index else 0,
                      resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER", **JPEG)
        tif.write(_tiles(macro), shape=macro.shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                  metadata=None, **JPEG)
    return path


def write_ndpi(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """Hamamatsu NDPI: each level one JPEG in one strip, with restart markers every 16 MCUs (OpenSlide reads those
    intervals as tiles), the source lens and focal plane in NDPI's private tags, the scale in resolution tags.
    Offsets are classic 32-bit TIFF's, without NDPI's 64-bit extension: OpenSlide reads the file, tifffile
    (tiffslide) does not."""
    import cv2

    magnification = 10 / mpp
    with tifffile.TiffWriter(path) as tif:
        for level in levels:
            lh, lw = level.shape[:2]
            interval = math.gcd(32, -(-lw // 8))  # in 8-px MCUs (4:4:4); OpenSlide needs it to divide a row of MCUs
            ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(level[..., ::-1]),
                                       [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, interval,
                                        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
            if not ok:
                raise ValueError(f"cannot encode a {lw}×{lh} NDPI level as JPEG")
            ds = levels[0].shape[1] / lw
            tags = [(65420, 4, 1, 1, True), (65421, 11, 1, magnification, True), (65422, 9, 1, 0, True),
                    (65423, 9, 1, 0, True), (65424, 9, 1, 0, True)]
            tif.write(iter([encoded.tobytes()]), shape=level.shape, dtype=np.uint8, photometric="ycbcr",
                      compression="jpeg", rowsperstrip=lh, metadata=None, subsampling=(1, 1),
                      resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER", extratags=tags)
    return path


def write_dicom(path: Path, levels: list[np.ndarray], mpp: float) -> Path:
    """DICOM-WSI (VL Whole Slide Microscopy, TILED_FULL): the levels written as Aperio SVS, then converted by
    wsidicomizer, which copies the JPEG tiles as they are (the same pixels). ``path`` becomes a folder of one
    ``.dcm`` per level; returns the level-0 file, which OpenSlide opens with the rest of its series."""
    try:
        from turbojpeg import TurboJPEG
        from wsidicomizer import WsiDicomizer

        TurboJPEG()  # loads the OS library
    except (ImportError, RuntimeError, OSError) as exc:  # test dependencies, not the toolkit's
        raise RuntimeError(f"writing DICOM-WSI needs wsidicomizer and the OS package libturbojpeg0: {exc}") from exc
    import pydicom

    path.mkdir(parents=True, exist_ok=True)
    svs = write_svs(path / "source.svs", levels, mpp)
    files = [Path(f) for f in WsiDicomizer.convert(svs, path / "dicom")]
    svs.unlink()
    width = levels[0].shape[1]
    return next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).TotalPixelMatrixColumns == width)


WRITERS: dict[str, Callable[[Path, list[np.ndarray], float], Path]] = {
    "svs": write_svs,
    "svs-j2k": lambda path, levels, mpp: write_svs(path, levels, mpp, j2k=True),
    "ome-tiff": write_ome,
    "philips-tiff": write_philips,
    "ventana": write_ventana,
    "leica-scn": write_leica,
    "ndpi": write_ndpi,
    "bigtiff": lambda path, levels, mpp: write_generic(path, levels, mpp, bigtiff=True),
    "flat-tiff": lambda path, levels, mpp: write_generic(path, levels[:1], mpp),
    "dicom": write_dicom,
}
SUFFIX = {"svs": ".svs", "svs-j2k": ".svs", "ome-tiff": ".ome.tif", "philips-tiff": ".tiff", "ventana": ".bif",
          "leica-scn": ".scn", "ndpi": ".ndpi", "bigtiff": ".tif", "flat-tiff": ".tif", "dicom": ""}


def write_format(fmt: str, folder: Path, name: str, levels: list[np.ndarray], mpp: float) -> Path:
    """Write ``levels`` as format ``fmt`` to ``folder/name<suffix>``."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(WRITERS)}")
    return WRITERS[fmt](Path(folder) / f"{name}{SUFFIX[fmt]}", levels, mpp)
