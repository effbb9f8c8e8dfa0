"""A slide's µm per pixel, from every place a vendor may put it, or a clear refusal: the slides.csv row, then
``slides.default_mpp``, then the reader's properties (Aperio ``MPP``, OpenSlide's), TIFF resolution tags with their
unit, an OME-TIFF's OME-XML, and the objective power as a last resort (with a warning)."""

from __future__ import annotations

import logging
from pathlib import Path

from wsi.units import PLAUSIBLE_MPP, plausible_mpp

log = logging.getLogger(__name__)


# what tifffile raises on a file it cannot parse as TIFF, or parses to no pages (an NDPI without its 64-bit
# extension, say): that source of metadata is then absent, never an error of the slide
TIFF_ERRORS = (OSError, ValueError, IndexError, KeyError, AttributeError)


def tiff_tag_mpp(path: Path) -> float | None:
    """µm per pixel from TIFF XResolution/ResolutionUnit of the first page, or None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if res is None or unit is None:
                return None
            num, den = res.value
            px_per_unit = num / den if den else 0.0
            microns_per_unit = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))
    except TIFF_ERRORS:
        return None
    if not microns_per_unit or px_per_unit <= 0:
        return None
    return microns_per_unit / px_per_unit


OME_UNITS_IN_MICRONS = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(path: Path) -> float | None:
    """µm per pixel from an OME-TIFF's OME-XML (the first image's ``Pixels`` ``PhysicalSizeX`` in its unit,
    micrometres when none is given), or None: OpenSlide and tiffslide do not read it."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata if tif.is_ome else None
        if not xml:
            return None
        pixels = next((e for e in ET.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    except (*TIFF_ERRORS, ET.ParseError):
        return None
    if pixels is None or pixels.get("PhysicalSizeX") in (None, ""):
        return None
    factor = OME_UNITS_IN_MICRONS.get(pixels.get("PhysicalSizeXUnit", "µm"))
    try:
        return float(pixels.get("PhysicalSizeX")) * factor if factor else None
    except ValueError:
        return None


def objective_power(properties: dict[str, str]) -> float | None:
    power = properties.get("openslide.objective-power") or properties.get("aperio.AppMag")
    try:
        return float(power) if power not in (None, "", "None") and float(power) > 0 else None
    except ValueError:
        return None


# the slide properties that carry a scan's µm/px: OpenSlide's own (it derives it from every vendor's metadata —
# Aperio MPP, DICOM PixelSpacing, Philips DICOM_PIXEL_SPACING, Leica nm/px, Ventana ScanRes, TIFF resolution),
# then the vendor keys tiffslide leaves as they are
MPP_PROPERTIES = ("openslide.mpp-x", "aperio.MPP", "tiffslide.mpp-x")


def _property_mpp(properties: dict[str, str]) -> tuple[float, str] | None:
    """(µm/px, the property it came from), or None."""
    for key in MPP_PROPERTIES:
        value = properties.get(key)
        if value not in (None, "", "None"):
            try:
                return float(value), key
            except ValueError:
                continue
    return None


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-3 * abs(b)


def description_note(path: Path, tif=None) -> str | None:
    """A note when the first page's ImageDescription is not UTF-8 (a scanner writing Latin-1, say): it is read
    with replacement characters by whichever reader accepts it, and the user is told. ``tif``: the slide's
    ``tifffile.TiffFile`` when its reader has it open (opening the file again took 2 ms of a slide's opening)."""
    import tifffile

    try:
        if tif is None:
            with tifffile.TiffFile(path) as own:
                raw = _description_bytes(own)
        else:
            with tif.filehandle.lock:
                raw = _description_bytes(tif)
    except TIFF_ERRORS:
        return None
    if raw is None:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"the TIFF ImageDescription is not UTF-8 (byte {raw[exc.start]:#04x} at {exc.start}): its text was read "
                f"with that character replaced")
    return None


def _description_bytes(tif) -> bytes | None:
    """The first page's ImageDescription as stored: tifffile's str has already replaced what is not UTF-8."""
    tag = tif.pages[0].tags.get("ImageDescription")
    if tag is None:
        return None
    tif.filehandle.seek(tag.valueoffset)
    return tif.filehandle.read(tag.count)


def resolve_mpp(path: Path, properties: dict[str, str], mpp: float | None, default_mpp: float | None
                ) -> tuple[float, str, str, list[str]]:
    """(µm/px, source, detail, notes) by the chain in the module docstring; :class:`ValueError` with the reason when
    no source gives one, or when the first that does gives a value no scan has."""
    notes: list[str] = []
    found = _property_mpp(properties)
    chain = [("csv", "the CSV's mpp column", lambda: mpp),
             ("properties", found[1] if found else "", lambda: found[0] if found else None),
             ("ome-xml", "OME-XML PhysicalSizeX", lambda: _ome_mpp(path)),
             ("tiff-tags", "TIFF XResolution/ResolutionUnit", lambda: tiff_tag_mpp(path))]
    for source, detail, find in chain:
        value = find()
        if value is None:
            continue
        if plausible_mpp(value):
            return float(value), source, detail, notes
        from_tags = source == "tiff-tags" or (source == "properties" and _same(value, tiff_tag_mpp(path)))
        if from_tags:  # 72/96/300 dpi from an image editor (readers turn the tags into properties): a print resolution
            notes.append(f"ignored TIFF resolution tags giving {value:g} µm/px: not a scan resolution")
            continue
        raise ValueError(f"mpp {value:g} µm/px from {source} ({detail}) is not a scan resolution (a scan is strictly "
                         f"between {PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]} µm/px): correct it, or give this slide an "
                         f"`mpp` in the CSV")
    if default_mpp is not None:
        notes.append(f"no mpp in the CSV, slide properties, OME-XML or TIFF tags: using the configured default "
                     f"{default_mpp:g} µm/px")
        return float(default_mpp), "default", "slides.default_mpp", notes
    objective = objective_power(properties)
    if objective is not None:  # the last resort: the scanner convention, 10 / magnification
        value = 10.0 / objective
        if not plausible_mpp(value):
            raise ValueError(f"mpp {value:g} µm/px estimated from the {objective:g}× objective power is not a scan "
                             f"resolution: give this slide an `mpp` in the CSV")
        notes.append(f"no mpp in the CSV, slide properties, OME-XML or TIFF tags: estimated {value:g} µm/px from "
                     f"the {objective:g}× objective (scanners differ by ±10 %); give an `mpp` to be exact")
        return value, "objective-power", "objective power", notes
    raise ValueError("no mpp found (CSV `mpp` column, slide properties, OME-XML, TIFF resolution tags, objective "
                     "power); add an `mpp` value for this slide or set `slides.default_mpp`")
