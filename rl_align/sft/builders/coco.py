"""MS-CustomNet multi-subject sets (ms_customnet.txt, MSI dataset construction) from COCO-format instance
annotations: salient instances (Eq. 1), images with enough of them (Eq. 2), per-category reference pools
(Eq. 3) and a layout map with smaller instances drawn on top (Eq. 4). Writes PNGs and a
``manifest.jsonl`` (``rl_align.sft.manifest`` format) under its output folder."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from rl_align.sft.builders.files import MANIFEST_NAME, join_captions, resize_mask, resize_rgb, save_mask, save_rgb
from rl_align.sft.manifest import SampleRecord, SubjectRecord, read_image, write_manifest




def decode_coco_rle_string(counts: str) -> list[int]:
    """Run lengths from COCO's compressed RLE string (pycocotools' rleFrString format).

    Each value is stored in 5-bit groups, least significant first, one character per group: character =
    48 + group, plus 0x20 when another group of the same value follows; on the last group, bit 0x10 is
    the sign (the value is sign-extended from there). From the fourth run on (index > 2), the stored
    value is the difference to the run two before (runs of the same colour have similar lengths).
    """
    runs: list[int] = []
    value, shift = 0, 0
    for position, character in enumerate(counts):
        chunk = ord(character) - 48
        if not 0 <= chunk < 64:
            raise ValueError(
                f"compressed RLE counts: character {character!r} at position {position} is outside '0'..'o' "
                f"(48..111)"
            )
        value |= (chunk & 0x1F) << shift
        shift += 5
        if chunk & 0x20:
            continue
        if chunk & 0x10:
            value -= 1 << shift  # two's complement sign extension at the last group's width
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    if shift:
        raise ValueError("compressed RLE counts: the string ends inside a value (its last character has 0x20 set)")
    return runs


def _runs_to_mask(runs: Sequence[int], height: int, width: int) -> np.ndarray:
    """Runs alternate background/foreground starting with background, over the pixels in column-major
    (Fortran) order; their sum must be height * width."""
    if any(run < 0 for run in runs):
        raise ValueError(f"RLE counts: expected non-negative run lengths, got {min(runs)}")
    if sum(runs) != height * width:
        raise ValueError(f"RLE counts: runs sum to {sum(runs)}, expected height * width = {height} * {width} = {height * width}")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape((height, width), order="F")


def _polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    if not polygons:
        raise ValueError("polygon segmentation: expected at least one polygon, got an empty list")
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            raise ValueError(
                f"polygon segmentation [{index}]: expected a flat list [x0, y0, x1, y1, ...] of at least 3 points, "
                f"got {str(polygon)[:80]}"
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon):
            raise ValueError(f"polygon segmentation [{index}]: expected finite numbers, got {str(polygon)[:80]}")
        draw.polygon([(polygon[i], polygon[i + 1]) for i in range(0, len(polygon), 2)], fill=1, outline=1)
    return np.asarray(canvas) > 0


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """bool (height, width) mask of a COCO segmentation: polygons (a list of flat [x0, y0, x1, y1, ...]
    lists, filled), uncompressed RLE ({"counts": [runs], "size": [h, w]}) or compressed RLE
    ({"counts": "<string>", "size": [h, w]}, see decode_coco_rle_string)."""
    if isinstance(segmentation, list):
        return _polygons_to_mask(segmentation, height, width)
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(
            f"segmentation: expected a list of polygons or an RLE object with 'counts' and 'size', got {str(segmentation)[:80]}"
        )
    size = segmentation["size"]
    if list(size) != [height, width]:
        raise ValueError(f"RLE size: expected [height, width] = [{height}, {width}] (the image's), got {size}")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        return _runs_to_mask(decode_coco_rle_string(counts), height, width)
    if isinstance(counts, list) and all(isinstance(run, int) and not isinstance(run, bool) for run in counts):
        return _runs_to_mask(counts, height, width)
    raise ValueError(f"RLE counts: expected a list of integers or a compressed string, got {str(counts)[:80]}")


def layout_draw_order(areas: Sequence[float]) -> list[int]:
    """Indices in compositing order for the layout map (MS-CustomNet Eq. 4): largest area first, ties in
    input order, so smaller instances are drawn later, on top (the occlusion prior of Sec. III-A)."""
    return sorted(range(len(areas)), key=lambda index: -areas[index])


# ---------------------------------------------------------------------------------------------------------
# MS-CustomNet sets from COCO


class CocoBuildReport(NamedTuple):
    """What build_coco_manifest wrote and filtered. Instance counts partition the annotations:
    instances_kept passed Eq. 1 (salient), the others failed it as crowd or too small; the salient
    instances of dropped images count as kept instances but appear in no sample."""

    manifest: Path
    categories: tuple[str, ...]  # categories of the written subjects, in the annotation file's order
    images_kept: int
    images_dropped: int  # fewer than alpha salient instances (Eq. 2)
    instances_kept: int
    instances_dropped_small: int  # area ratio <= beta (Eq. 1)
    instances_dropped_crowd: int


class CocoImage(NamedTuple):
    id: int
    file_name: str
    width: int
    height: int


class CocoInstance(NamedTuple):
    id: int
    image_id: int
    category_id: int
    segmentation: object  # polygons or RLE, rasterized on demand so masks are not all held at once
    bbox: tuple[float, float, float, float]  # COCO (x, y, width, height) in pixels
    iscrowd: bool


class PixelBox(NamedTuple):
    left: int
    top: int
    right: int  # exclusive
    bottom: int  # exclusive


@dataclass(frozen=True, eq=False)  # eq=False: the arrays have no single truth value to compare
class PoolEntry:
    """One reference of a category's pool: the instance's bbox crop, white outside its mask."""

    annotation_id: int
    image_id: int
    reference: str  # path relative to the output folder
    reference_mask: str
    pixels: np.ndarray  # uint8 (h, w, 3), kept for the layout maps
    mask: np.ndarray  # bool (h, w)


def _fail(annotation_file: Path, what: str, message: str) -> ValueError:
    return ValueError(f"{annotation_file}: {what}: {message}")


def _integer(record: dict, key: str, annotation_file: Path, what: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(annotation_file, what, f"'{key}' must be an integer, got {value!r}")
    return value


def _load_json_object(path: Path, keys: Sequence[str]) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found (expected a COCO-format JSON file)")
    try:
        document = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object with {', '.join(keys)}, got {type(document).__name__}")
    for key in keys:
        if not isinstance(document.get(key), list):
            raise ValueError(f"{path}: expected a list under '{key}', got {document.get(key)!r:.80}")
    return document


def _parse_images(document: dict, annotation_file: Path) -> list[CocoImage]:
    images = []
    for entry in document["images"]:
        if not isinstance(entry, dict):
            raise _fail(annotation_file, "images", f"expected objects, got {entry!r:.80}")
        what = f"image id {entry.get('id')!r}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise _fail(annotation_file, what, f"'file_name' must be a non-empty string, got {file_name!r}")
        image = CocoImage(
            _integer(entry, "id", annotation_file, what),
            file_name,
            _integer(entry, "width", annotation_file, what),
            _integer(entry, "height", annotation_file, what),
        )
        if image.width < 1 or image.height < 1:
            raise _fail(annotation_file, what, f"width and height must be positive, got {image.width}x{image.height}")
        images.append(image)
    return images


def _parse_categories(document: dict, annotation_file: Path) -> dict[int, str]:
    names = {}
    for entry in document["categories"]:
        if not isinstance(entry, dict):
            raise _fail(annotation_file, "categories", f"expected objects, got {entry!r:.80}")
        what = f"category id {entry.get('id')!r}"
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(annotation_file, what, f"'name' must be a non-empty string, got {name!r}")
        names[_integer(entry, "id", annotation_file, what)] = name.strip()
    return names


def _parse_instance(entry: object, annotation_file: Path, image_ids: set[int], category_ids: set[int]) -> CocoInstance:
    if not isinstance(entry, dict):
        raise _fail(annotation_file, "annotations", f"expected objects, got {entry!r:.80}")
    what = f"annotation id {entry.get('id')!r}"
    annotation_id = _integer(entry, "id", annotation_file, what)
    image_id = _integer(entry, "image_id", annotation_file, what)
    if image_id not in image_ids:
        raise _fail(annotation_file, what, f"image_id {image_id} is not among the file's images")
    category_id = _integer(entry, "category_id", annotation_file, what)
    if category_id not in category_ids:
        raise _fail(annotation_file, what, f"category_id {category_id} is not among the file's categories")
    bbox = entry.get("bbox")
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        or bbox[2] < 0
        or bbox[3] < 0
    ):
        raise _fail(annotation_file, what, f"'bbox' must be [x, y, width, height] with width, height >= 0, got {bbox!r:.80}")
    iscrowd = entry.get("iscrowd", 0)  # COCO-format exports of non-COCO data often leave it out
    if iscrowd not in (0, 1):
        raise _fail(annotation_file, what, f"'iscrowd' must be 0 or 1, got {iscrowd!r}")
    if "segmentation" not in entry:
        raise _fail(annotation_file, what, "'segmentation' is missing")
    return CocoInstance(annotation_id, image_id, category_id, entry["segmentation"], tuple(bbox), bool(iscrowd))


def _instance_mask(instance: CocoInstance, image: CocoImage, annotation_file: Path) -> np.ndarray:
    try:
        return segmentation_mask(instance.segmentation, image.height, image.width)
    except ValueError as exc:
        raise _fail(annotation_file, f"annotation id {instance.id} (image id {image.id})", str(exc)) from exc


def _pixel_box(instance: CocoInstance, image: CocoImage, annotation_file: Path) -> PixelBox:
    """The bbox rounded outwards to whole pixels and clipped to the image."""
    x, y, w, h = instance.bbox
    box = PixelBox(
        max(0, math.floor(x)), max(0, math.floor(y)), min(image.width, math.ceil(x + w)), min(image.height, math.ceil(y + h))
    )
    if box.right <= box.left or box.bottom <= box.top:
        raise _fail(
            annotation_file,
            f"annotation id {instance.id}",
            f"bbox {list(instance.bbox)} has no pixel inside the {image.width}x{image.height} image",
        )
    return box


def _article(name: str) -> str:
    """"an" before a vowel letter, "a" otherwise (COCO's 80 names have no exception to this)."""
    return "an" if name[0].lower() in "aeiou" else "a"


def _first_captions(captions_file: Path) -> dict[int, str]:
    document = _load_json_object(captions_file, ("annotations",))
    first: dict[int, str] = {}
    for entry in document["annotations"]:
        what = f"caption annotation id {entry.get('id')!r}" if isinstance(entry, dict) else "annotations"
        if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str) or not entry["caption"].strip():
            raise _fail(captions_file, what, f"expected an object with a non-empty 'caption', got {entry!r:.80}")
        first.setdefault(_integer(entry, "image_id", captions_file, what), entry["caption"].strip())
    return first


def _image_file(image_dir: Path, image: CocoImage, instances: Sequence[CocoInstance], annotation_file: Path) -> Path:
    path = Path(image_dir) / image.file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: image file not found for image id {image.id} of {annotation_file} "
            f"(annotation ids {[instance.id for instance in instances]})"
        )
    with Image.open(path) as opened:
        if opened.size != (image.width, image.height):
            raise ValueError(
                f"{path}: image is {opened.size[0]}x{opened.size[1]}, but {annotation_file} image id {image.id} "
                f"says {image.width}x{image.height}"
            )
    return path


def _reference_crop(pixels: np.ndarray, mask: np.ndarray, box: PixelBox) -> tuple[np.ndarray, np.ndarray]:
    """The bbox crop of the image with pixels outside the instance mask painted white, and the cropped mask."""
    crop_mask = mask[box.top : box.bottom, box.left : box.right]
    crop = pixels[box.top : box.bottom, box.left : box.right].copy()
    crop[~crop_mask] = 255
    return crop, crop_mask


def compose_layout(
    height: int, width: int, boxes: Sequence[PixelBox], references: Sequence[PoolEntry], areas: Sequence[float]
) -> np.ndarray:
    """The MS-CustomNet layout map (Eq. 4, Fig. 1c): on a black (zero) canvas of the target size, each
    subject's reference is resized to its instance's box and pasted where its resized reference mask is
    set, in layout_draw_order(areas), so smaller instances end up on top."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for index in layout_draw_order(areas):
        box, reference = boxes[index], references[index]
        box_width, box_height = box.right - box.left, box.bottom - box.top
        pixels = resize_rgb(reference.pixels, box_width, box_height)
        mask = resize_mask(reference.mask, box_width, box_height)
        canvas[box.top : box.bottom, box.left : box.right][mask] = pixels[mask]
    return canvas


def build_coco_manifest(
    annotation_file: Path,
    image_dir: Path,
    out_dir: Path,
    beta: float = 0.015,
    alpha: int = 2,
    pool_size: int = 30,
    seed: int = 0,
    captions_file: Path | None = None,
) -> CocoBuildReport:
    """Build an MS-CustomNet (MSI-style) multi-subject manifest from COCO instance annotations.

    Eq. 1: an instance is salient iff iscrowd == 0 and mask area / (W * H) > beta (area of the rasterized
    segmentation). Eq. 2: an image is kept iff it has >= alpha salient instances; its salient instances
    become its subjects, in annotation order. Eq. 3: each category's reference pool holds at most
    ``pool_size`` salient instances of kept images (chosen with the seed), each a bbox crop painted white
    outside its mask, with the cropped mask as reference_mask; each subject's reference is drawn uniformly
    from its category's pool, among the entries from other images when there are any (against copy-paste).
    Eq. 4: the layout map (compose_layout). Caption "a"/"an" + category name; prompt = the image's first
    COCO caption when ``captions_file`` is given, else "a photo of " + the listed captions.
    """
    annotation_file, image_dir, out_dir = Path(annotation_file), Path(image_dir), Path(out_dir)
    if not 0 <= beta < 1:
        raise ValueError(f"beta: expected an area ratio in [0, 1), got {beta}")
    if alpha < 1 or pool_size < 1:
        raise ValueError(f"alpha and pool_size: expected at least 1, got alpha={alpha}, pool_size={pool_size}")
    document = _load_json_object(annotation_file, ("images", "annotations", "categories"))
    images = _parse_images(document, annotation_file)
    category_names = _parse_categories(document, annotation_file)
    image_by_id = {image.id: image for image in images}
    instances_of: dict[int, list[CocoInstance]] = {image.id: [] for image in images}
    for entry in document["annotations"]:
        instance = _parse_instance(entry, annotation_file, set(image_by_id), set(category_names))
        instances_of[instance.image_id].append(instance)
    first_caption = _first_captions(Path(captions_file)) if captions_file is not None else None

    # Eq. 1 and 2: keep only areas, masks are rasterized again when written (COCO-sized sets do not fit in memory).
    salient_of: dict[int, list[tuple[CocoInstance, int]]] = {}
    dropped_small = dropped_crowd = kept_instances = 0
    for image in images:
        salient = []
        for instance in instances_of[image.id]:
            if instance.iscrowd:
                dropped_crowd += 1
                continue
            area = int(_instance_mask(instance, image, annotation_file).sum())
            if area / (image.width * image.height) > beta:
                salient.append((instance, area))
            else:
                dropped_small += 1
        kept_instances += len(salient)
        if len(salient) >= alpha:
            salient_of[image.id] = salient
    if not salient_of:
        raise ValueError(
            f"{annotation_file}: no image has at least alpha={alpha} instances with area ratio > beta={beta} "
            f"({len(images)} images, {kept_instances} salient instances)"
        )
    kept_images = [image for image in images if image.id in salient_of]
    image_files = {image.id: _image_file(image_dir, image, instances_of[image.id], annotation_file) for image in kept_images}
    if first_caption is not None:
        uncaptioned = [image.id for image in kept_images if image.id not in first_caption]
        if uncaptioned:
            raise ValueError(f"{captions_file}: no caption for kept image id(s) {uncaptioned[:20]} of {annotation_file}")

    rng = np.random.default_rng(seed)
    candidates: dict[int, list[CocoInstance]] = {category_id: [] for category_id in category_names}
    for image in kept_images:
        for instance, _ in salient_of[image.id]:
            candidates[instance.category_id].append(instance)
    pooled: set[int] = set()
    for category_id in category_names:  # the file's category order, so the draws are reproducible
        members = candidates[category_id]
        if len(members) > pool_size:
            chosen = np.sort(rng.choice(len(members), size=pool_size, replace=False))
            members = [members[index] for index in chosen]
        pooled.update(instance.id for instance in members)

    pools: dict[int, list[PoolEntry]] = {category_id: [] for category_id in category_names}
    for image in kept_images:
        pool_members = [instance for instance, _ in salient_of[image.id] if instance.id in pooled]
        if not pool_members:
            continue
        pixels = read_image(image_files[image.id])
        for instance in pool_members:
            box = _pixel_box(instance, image, annotation_file)
            crop, crop_mask = _reference_crop(pixels, _instance_mask(instance, image, annotation_file), box)
            if not crop_mask.any():
                raise _fail(
                    annotation_file, f"annotation id {instance.id}", f"bbox {list(instance.bbox)} does not overlap its segmentation"
                )
            stem = f"references/{instance.category_id}/{instance.id}"
            save_rgb(crop, out_dir / f"{stem}.png")
            save_mask(crop_mask, out_dir / f"{stem}-mask.png")
            entry = PoolEntry(instance.id, image.id, f"{stem}.png", f"{stem}-mask.png", crop, crop_mask)
            pools[instance.category_id].append(entry)

    records = []
    for image in kept_images:
        salient = salient_of[image.id]
        image_file = image_files[image.id]
        target = f"targets/{image.id}{image_file.suffix.lower()}"
        (out_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_file, out_dir / target)
        subjects, boxes, references = [], [], []
        for k, (instance, _) in enumerate(salient):
            pool = pools[instance.category_id]
            other_images = [entry for entry in pool if entry.image_id != image.id]
            choices = other_images or pool
            reference = choices[int(rng.integers(len(choices)))]
            mask = f"masks/{image.id}-{k}.png"
            save_mask(_instance_mask(instance, image, annotation_file), out_dir / mask)
            name = category_names[instance.category_id]
            subjects.append(SubjectRecord(reference.reference, name, f"{_article(name)} {name}", mask, reference.reference_mask))
            boxes.append(_pixel_box(instance, image, annotation_file))
            references.append(reference)
        layout = f"layouts/{image.id}.png"
        save_rgb(compose_layout(image.height, image.width, boxes, references, [area for _, area in salient]), out_dir / layout)
        listed = join_captions([subject.caption for subject in subjects])
        prompt = first_caption[image.id] if first_caption is not None else f"a photo of {listed}"
        records.append(SampleRecord(target, prompt, tuple(subjects), layout))

    used = {instance.category_id for image in kept_images for instance, _ in salient_of[image.id]}
    return CocoBuildReport(
        manifest=write_manifest(records, out_dir / MANIFEST_NAME),
        categories=tuple(category_names[category_id] for category_id in category_names if category_id in used),
        images_kept=len(kept_images),
        images_dropped=len(images) - len(kept_images),
        instances_kept=kept_instances,
        instances_dropped_small=dropped_small,
        instances_dropped_crowd=dropped_crowd,
    )


