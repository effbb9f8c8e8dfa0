"""slides.csv: the cohort a run works on.

Columns: ``slide_path`` (relative paths resolve against the CSV's folder), optional ``slide_id``,
``label``, ``case_id`` (defaults to the slide id; keeps a patient's slides in one split), ``split``
(train/val/test) and ``mpp`` (overrides the slide's own). A row with a ``slide_id`` and no
``slide_path`` is a features-only slide: its features were imported (``import-features``), and
only the stages that need no pixels run on it. Problems with the CSV
itself are collected and raised together, each naming its line and column; a slide file that is
missing is not a CSV error: that slide fails at run time with the line named, the others go on.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from wsi.units import PLAUSIBLE_MPP, plausible_mpp

log = logging.getLogger(__name__)

REQUIRED = ("slide_path",)
OPTIONAL = ("slide_id", "label", "case_id", "split", "mpp")
SPLITS = ("train", "val", "test")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ManifestError(ValueError):
    """slides.csv cannot be used; ``problems`` lists each as "line N, column C: what"."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + ("\n  ".join([""] + problems) if len(problems) > 1 else problems[0]))


@dataclass(frozen=True)
class SlideEntry:
    """One row of slides.csv, resolved."""

    slide_id: str
    slide_path: Path | None  # None: a features-only slide (imported features, no slide file)
    line: int
    label: str | None = None
    case_id: str | None = None
    split: str | None = None
    mpp: float | None = None

    def where(self) -> str:
        """"line N, column slide_path" — for errors about the slide file."""
        return f"line {self.line}, column slide_path"

    @property
    def has_pixels(self) -> bool:
        """False for a features-only slide (no slide file: only its imported features)."""
        return self.slide_path is not None


@dataclass(frozen=True)
class FoldPayload:
    """What a fold task (one of several cohort-like tasks of a stage) runs on: its key and its slides."""

    key: str
    entries: list[SlideEntry]


def sanitize_slide_id(raw: str) -> str:
    """A file-name-safe id: letters, digits, ``. _ -`` only; path parts like ``..`` dropped; never empty or hidden."""
    parts = [p for p in re.split(r"[/\\]+", raw.strip()) if p not in ("", ".", "..")]
    cleaned = _UNSAFE.sub("_", "_".join(parts)).strip("_.")
    return cleaned or "slide"


def _default_id(path_text: str) -> str:
    name = Path(path_text.replace("\\", "/")).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _read_text(path: Path) -> str:
    """slides.csv as text: UTF-8 (with or without a BOM), not empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, ["file not found"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(path, [f"line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                   "save the CSV as UTF-8"]) from None
    if not text.strip():
        raise ManifestError(path, ["the file is empty; expected a header row with at least `slide_path`"])
    return text


def _check_header(path: Path, header: list[str]) -> None:
    if "slide_path" not in header and "slide_id" not in header:
        raise ManifestError(path, [f"line 1: missing required column `slide_path` (or `slide_id`, for a features-only "
                                   f"cohort) (header is {header})"])
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise ManifestError(path, [f"line 1: column `{c}` appears more than once" for c in duplicated])
    unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
    if unknown:
        log.warning("%s: ignoring unknown column(s) %s (known: %s)", path, unknown, list(REQUIRED + OPTIONAL))


def _parse_row(values: dict[str, str], line: int, base: Path, seen: dict[str, int]) -> SlideEntry | str:
    """One row as a :class:`SlideEntry`, or the problem with it (naming its line and column)."""
    slide_path = values.get("slide_path", "")
    if not slide_path and not values.get("slide_id"):
        return f"line {line}, column slide_path: empty (give the slide file, or a slide_id whose features were imported)"
    slide_id = sanitize_slide_id(values.get("slide_id") or _default_id(slide_path))
    if slide_id in seen:
        hint = "" if values.get("slide_id") else " (ids come from file names; add a `slide_id` column)"
        return f"line {line}, column slide_id: duplicate id {slide_id!r}, already used on line {seen[slide_id]}{hint}"
    seen[slide_id] = line
    mpp = None
    if values.get("mpp"):
        try:
            mpp = float(values["mpp"])
            if not plausible_mpp(mpp):
                raise ValueError
        except ValueError:
            return (f"line {line}, column mpp: {values['mpp']!r} is not a number of µm per pixel strictly between "
                    f"{PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]}")
    split = values.get("split") or None
    if split is not None and split not in SPLITS:
        return f"line {line}, column split: {split!r} is not one of {list(SPLITS)}"
    resolved = None
    if slide_path:
        resolved = Path(slide_path).expanduser()
        if not resolved.is_absolute():
            resolved = base / resolved
        resolved = Path(os.path.normpath(resolved))
    return SlideEntry(slide_id=slide_id, slide_path=resolved, line=line, label=values.get("label") or None,
                      case_id=values.get("case_id") or slide_id, split=split, mpp=mpp)


def read_manifest(path: str | Path) -> list[SlideEntry]:
    """Parse and validate slides.csv. Raises :class:`ManifestError` listing every problem found."""
    path = Path(path)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header = [h.strip() for h in next(reader)]
    _check_header(path, header)
    problems: list[str] = []
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    base = path.parent.absolute()  # absolute: the run stores these paths and must find them from anywhere
    start = reader.line_num + 1  # where the next record starts (a quoted field may span lines)
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != len(header):
            problems.append(f"line {line}: {len(row)} fields, but the header has {len(header)}")
            continue
        parsed = _parse_row({h: cell.strip() for h, cell in zip(header, row)}, line, base, seen)
        (problems if isinstance(parsed, str) else entries).append(parsed)
    if problems:
        raise ManifestError(path, problems)
    if not entries:
        raise ManifestError(path, ["no slides: the file has a header but no rows"])
    return entries


def manifest_csv(entries: list[SlideEntry]) -> str:
    """The resolved manifest as CSV text (absolute paths, sanitised ids), as a run stores it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REQUIRED + OPTIONAL)
    for e in entries:
        writer.writerow(["" if e.slide_path is None else str(e.slide_path), e.slide_id, e.label or "", e.case_id or "", e.split or "",
                         "" if e.mpp is None else repr(e.mpp)])
    return buffer.getvalue()
