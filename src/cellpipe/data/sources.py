"""Find the images of a source folder and what each one is labelled, by layout.

Three layouts cover the projects cellpipe grows from:

* ``class_folders`` — ``root/<class>/*`` or ``root/<SPLIT>/<class>/*`` (white cells, malaria);
* ``filename_labels`` — ``labeled/*_<k>.jpg``, ``unlabeled/*``, ``test/*_<k>.jpg`` (melanoma);
* ``voc`` — ``JPEGImages/`` + ``Annotations/*.xml`` (+ ``ImageSets/Main``): one
  item per slide carrying its annotated objects (BCCD).

Discovery opens no image: it only walks folders and reads annotations. Anything
found that cannot become training data is returned as a :class:`Rejection`, never
skipped silently.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cellpipe.data.imageio import IMAGE_SUFFIXES
from cellpipe.errors import InputError
from cellpipe.fsutil import displayable, is_hidden, is_utf8, outside

Layout = Literal["auto", "class_folders", "filename_labels", "voc"]

# Folder names that mean "this is a split, not a class" (compared case-insensitively).
SPLIT_FOLDER_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
FILENAME_LABEL_FOLDERS = {"labeled": "train", "unlabeled": "unlabeled", "test": "test"}
_FILENAME_LABEL = re.compile(r"_(\d+)$")


@dataclass(frozen=True)
class AnnotatedObject:
    """One object drawn on a slide: its class name and pixel box (x0, y0, x1, y1)."""

    label: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class SourceItem:
    """One image file found in a source, before it is opened.

    ``split`` is set when the layout itself assigns one (TRAIN/TEST folders,
    ``test/``, ImageSets); ``source_id`` groups files that must share a split.
    """

    path: str
    label: str | None
    split: str | None
    source_id: str
    objects: tuple[AnnotatedObject, ...] | None = None


@dataclass(frozen=True)
class Rejection:
    """An input that did not make it into the manifest, and why."""

    path: str
    reason: str


HIDDEN_REASON = "hidden file (a name part starts with '.'): not ingested; rename it to use it"


@dataclass
class Discovery:
    """What a layout found: usable items, rejections, and the class list it implies.

    Hidden files are listed with their reason too, apart from the rejections: a folder
    copied from a Mac holds a ``.DS_Store`` in every class folder, and those are not
    inputs that failed (they do not count towards ``ingest.max_rejected_fraction``).
    """

    items: list[SourceItem] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    hidden: list[Rejection] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # folders outside the layout, logged


def detect_layout(root: Path) -> Layout:
    """Guess the layout from the folder names under ``root``."""
    names = {child.name.lower() for child in root.iterdir() if child.is_dir()}
    if {"annotations", "jpegimages"} <= names:
        return "voc"
    if names & {"labeled", "unlabeled"}:
        return "filename_labels"
    return "class_folders"


def discover(root: Path, layout: Layout, *, classes: Sequence[str],
             group_pattern: str | None = None, links_out: bool = False) -> Discovery:
    """Walk ``root`` according to ``layout`` (``auto`` detects it).

    Files behind symbolic links that resolve outside ``root`` are rejected unless
    ``links_out``; hidden files are listed in :attr:`Discovery.hidden`.
    """
    if not root.is_dir():
        raise InputError(f"source folder not found: {root}")
    if layout == "auto":
        layout = detect_layout(root)
    grouping = _Grouping(group_pattern)
    walk = _Walk(root, links_out)
    if layout == "class_folders":
        found = _discover_class_folders(root, grouping, walk)
    elif layout == "filename_labels":
        found = _discover_filename_labels(root, classes, grouping, walk)
    elif layout == "voc":
        found = _discover_voc(root, walk)
    else:
        raise ValueError(f"unknown layout {layout!r}; valid: auto, class_folders, "
                         f"filename_labels, voc")
    found.rejections[:0] = walk.refused_links
    found.hidden = _hidden_files(root)
    return found


# --- class folders ---------------------------------------------------------------------


def _discover_class_folders(root: Path, grouping: _Grouping, walk: _Walk) -> Discovery:
    found = Discovery()
    top = _visible_dirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_FOLDER_NAMES]
    if split_dirs:
        found.ignored = [d.name for d in top if d not in split_dirs]
        for split_dir in split_dirs:
            split = SPLIT_FOLDER_NAMES[split_dir.name.lower()]
            _add_class_dirs(root, split_dir, split, grouping, found, walk)
    else:
        _add_class_dirs(root, root, None, grouping, found, walk)
    return found


def _add_class_dirs(root: Path, parent: Path, split: str | None, grouping: _Grouping,
                    found: Discovery, walk: _Walk) -> None:
    for class_dir in _visible_dirs(parent):
        for file in walk.files(class_dir):
            relative = file.relative_to(root).as_posix()
            if not _is_image(file):
                found.rejections.append(_unsupported(relative, file))
                continue
            found.items.append(SourceItem(relative, class_dir.name, split, grouping(relative)))


# --- labels in file names ----------------------------------------------------------------


def _discover_filename_labels(root: Path, classes: Sequence[str], grouping: _Grouping,
                              walk: _Walk) -> Discovery:
    found = Discovery()
    folders = {d.name.lower(): d for d in _visible_dirs(root)}
    found.ignored = [name for name in folders if name not in FILENAME_LABEL_FOLDERS]
    for name, split in FILENAME_LABEL_FOLDERS.items():
        if name not in folders:
            continue
        for file in walk.files(folders[name]):
            relative = file.relative_to(root).as_posix()
            if not _is_image(file):
                found.rejections.append(_unsupported(relative, file))
                continue
            label: str | None = None
            if split != "unlabeled":
                match = _FILENAME_LABEL.search(file.stem)
                if match is None:
                    reason = "no label in file name: expected '<name>_<k>', k a class index"
                    found.rejections.append(Rejection(relative, reason))
                    continue
                label = _class_from_index(int(match.group(1)), classes)
            found.items.append(SourceItem(relative, label, split, grouping(relative)))
    return found


def _class_from_index(index: int, classes: Sequence[str]) -> str:
    """Map a file-name class index to its name; out-of-range indices stay as digits.

    An unknown index is reported later by the class-list check, with the list.
    """
    return classes[index] if index < len(classes) else str(index)


# --- VOC-annotated slides ----------------------------------------------------------------


def _discover_voc(root: Path, walk: _Walk) -> Discovery:
    found = Discovery()
    images_dir, annotations_dir = _child(root, "JPEGImages"), _child(root, "Annotations")
    given_splits = _voc_image_sets(root)
    images = {}
    for file in walk.files(images_dir):
        if _is_image(file):
            images[file.stem] = file
        else:
            found.rejections.append(_unsupported(file.relative_to(root).as_posix(), file))
    annotated: set[str] = set()
    for xml_file in sorted(annotations_dir.glob("*.xml")):
        xml_relative = xml_file.relative_to(root).as_posix()
        try:
            image_name, objects = _parse_voc(xml_file)
        except (ET.ParseError, ValueError) as error:
            found.rejections.append(Rejection(xml_relative, f"unreadable VOC annotation: {error}"))
            continue
        stem = Path(image_name).stem if image_name else xml_file.stem
        image = images.get(stem) or images.get(xml_file.stem)
        if image is None:
            reason = f"annotated image '{image_name}' not found"
            found.rejections.append(Rejection(xml_relative, reason))
            continue
        annotated.add(image.stem)
        relative = image.relative_to(root).as_posix()
        found.items.append(SourceItem(relative, None, given_splits.get(image.stem), image.stem,
                                      objects=tuple(objects)))
    for stem, image in sorted(images.items()):
        if stem not in annotated:
            relative = image.relative_to(root).as_posix()
            found.rejections.append(Rejection(relative, "no VOC annotation"))
    return found


def _parse_voc(xml_file: Path) -> tuple[str, list[AnnotatedObject]]:
    tree = ET.parse(xml_file).getroot()
    objects = []
    for element in tree.iter("object"):
        name = (element.findtext("name") or "").strip()
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise ValueError(f"object '{name}' has no <bndbox>")
        coords = tuple(int(round(float(bndbox.findtext(k) or "nan")))
                       for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(AnnotatedObject(name, coords))  # type: ignore[arg-type]
    return (tree.findtext("filename") or "").strip(), objects


def _voc_image_sets(root: Path) -> dict[str, str]:
    """Split per image stem from ImageSets/Main/{train,val,test}.txt, when present."""
    main = root / "ImageSets" / "Main"
    splits: dict[str, str] = {}
    for split in ("train", "val", "test"):
        listing = main / f"{split}.txt"
        if listing.is_file():
            for line in listing.read_text().split():
                splits[line.strip()] = split
    return splits


# --- shared helpers --------------------------------------------------------------------


class _Grouping:
    """Source id of a file: a regex group searched in its relative path, else the path.

    The path (not only the name) is searched so that an id can include a folder:
    ``([A-Z]+/_\\d+)_`` groups augmentations of one source cell per class folder,
    while ``([^/]+)_cell_\\d+`` ignores the class folder, so the cells of one slide
    group together whichever class they are in.
    """

    def __init__(self, pattern: str | None) -> None:
        self.pattern = re.compile(pattern) if pattern else None

    def __call__(self, relative: str) -> str:
        if self.pattern is not None:
            match = self.pattern.search(relative)
            if match:
                return match.group(1) if match.groups() else match.group(0)
        return relative


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


class _Walk:
    """Files below a folder, in a stable order, hidden ones, links out of the source and
    names that are not UTF-8 left out; those it refused are kept, with the reason, for the
    rejected list."""

    def __init__(self, root: Path, links_out: bool) -> None:
        self.root, self.links_out = root, links_out
        self.refused_links: list[Rejection] = []

    def files(self, folder: Path) -> Iterator[Path]:
        """Broken symlinks are included: inputs that cannot be read must be rejected."""
        found = []
        for current, folders, names in os.walk(folder, followlinks=self.links_out):
            here = Path(current)
            for name in list(folders):
                if self._refuse(here / name):
                    folders.remove(name)  # a linked folder out of the source: not entered
            found += [here / name for name in names]
        for path in sorted(found):
            relative = path.relative_to(self.root).as_posix()
            if is_hidden(relative) or self._refuse(path):
                continue
            if not is_utf8(relative):
                self.refused_links.append(Rejection(
                    displayable(relative),
                    "file name is not valid UTF-8 (e.g. Latin-1 from an old file share): "
                    "rename it to ingest it"))
                continue
            yield path

    def _refuse(self, path: Path) -> bool:
        """Record ``path`` as refused when it resolves outside the source folder."""
        target = None if self.links_out else outside(path, self.root)
        if target is None:
            return False
        self.refused_links.append(Rejection(
            path.relative_to(self.root).as_posix(),
            f"symbolic link to {target}, outside the source folder: not followed "
            f"(ingest.follow_links_out: true allows it, e.g. for DVC's symlink cache)"))
        return True


def _hidden_files(root: Path) -> list[Rejection]:
    """Every hidden file below ``root`` (or below a hidden folder), with the reason."""
    return [Rejection(displayable(path.relative_to(root).as_posix()), HIDDEN_REASON)
            for path in sorted(root.rglob("*"))
            if is_hidden(path.relative_to(root).as_posix()) and not path.is_dir()]


def _is_image(file: Path) -> bool:
    return file.suffix.lower() in IMAGE_SUFFIXES


def _unsupported(relative: str, file: Path) -> Rejection:
    supported = ", ".join(sorted(IMAGE_SUFFIXES))
    return Rejection(relative, f"unsupported file type '{file.suffix or '(none)'}' "
                               f"(supported: {supported})")


def _child(root: Path, name: str) -> Path:
    """The sub-folder ``name`` of ``root``, matched case-insensitively."""
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    raise InputError(f"VOC layout needs a '{name}/' folder in {root}")
