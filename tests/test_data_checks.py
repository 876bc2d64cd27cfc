"""Bad input: every kind is counted and skipped with one warning, or raises under strict=True."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from detector.data.readers.checks import BENIGN, PROBLEMS, CheckReport, DataError, check_boxes, data_error_message
from detector.data.readers.coco import CocoDetection
from detector.data.readers.voc import VocDetection
from detector.data.readers.yolo import YoloDetection

H, W = 30, 40  # the good image


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _jpg(array: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", array)[1].tobytes()


NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
GOOD = _png(np.full((H, W, 3), 100, np.uint8))


def _coco(tmp_path: Path, files: dict[str, bytes], images: list[tuple], anns: list[tuple], **kwargs) -> CocoDetection:
    """images: (id, file_name, h, w); anns: (image_id, category_id, bbox); categories 1 and 2."""
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (tmp_path / "img" / name).write_bytes(data)
    coco = {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in images],
        "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b} for k, (i, c, b) in enumerate(anns)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))  # NaN is written as the JSON extension NaN
    return CocoDetection(tmp_path / "img", tmp_path / "ann.json", **kwargs)


OK_IMAGE, OK_BOX = (1, "good.png", H, W), (1, 1, [1, 2, 10, 5])
CASES = {
    # kind: (extra files, extra image entries, extra annotations, expected count)
    "missing_file": ({}, [(2, "gone.png", H, W)], [], 1),
    "unreadable_image": ({"bad.jpg": b"not an image at all"}, [(2, "bad.jpg", H, W)], [], 1),
    "truncated_image": (
        {"t.jpg": _jpg(NOISE)[: len(_jpg(NOISE)) // 2], "t.png": _png(NOISE)[: len(_png(NOISE)) // 2]},
        [(2, "t.jpg", 64, 64), (3, "t.png", 64, 64)],
        [],
        2,
    ),
    "size_mismatch": ({"other.png": GOOD}, [(2, "other.png", H + 1, W)], [], 1),
    "duplicate_image_id": ({}, [(1, "good.png", H, W)], [], 1),  # the same entry again (other files: test_data_coco)
    "duplicate_file": ({}, [(2, "good.png", H, W)], [], 1),
    "bad_annotation": ({}, [], [(1, 1, [0, 0, 5]), (7, 1, [0, 0, 5, 5])], 2),
    "box_nonfinite": ({}, [], [(1, 1, [math.nan, 0, 5, 5]), (1, 1, [0, 0, math.inf, 5])], 2),
    "class_out_of_range": ({}, [], [(1, 99, [0, 0, 5, 5])], 1),
    "box_empty": ({}, [], [(1, 1, [3, 3, 0, 5]), (1, 2, [3, 3, 4, -1])], 2),
    "box_outside": ({}, [], [(1, 1, [41, 0, 5, 5])], 1),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_problem_is_counted_skipped_and_warned_once(tmp_path, kind):
    files, images, anns, n = CASES[kind]
    with pytest.warns(UserWarning, match=rf"problems: {kind}={n}\b") as record:
        ds = _coco(tmp_path, {"good.png": GOOD, **files}, [OK_IMAGE, *images], [OK_BOX, *anns])
    assert len(record) == 1 and ds.report.problems == {kind: n}
    assert f": {kind} - {PROBLEMS[kind]}" in str(record[0].message)  # an example names file + problem
    kept = 2 if kind == "duplicate_file" else 1
    assert len(ds) == kept and ds.report.images_kept == kept
    np.testing.assert_array_equal(ds[0]["boxes"], [[1, 2, 11, 7]])  # the good box survives untouched
    with pytest.raises(ValueError, match=rf"(?s)bad input \(strict=True\).*{kind}={n}.*: {kind} - "):
        CocoDetection(tmp_path / "img", tmp_path / "ann.json", strict=True)


def test_conversions_are_benign_and_exact(tmp_path):
    gray16 = np.full((4, 6), 257 * 100, np.uint16)  # 16-bit: v >> 8 -> 100
    rgb16 = np.zeros((4, 6, 3), np.uint16)
    rgb16[...] = (257 * 10, 257 * 200, 65535)  # BGR order on disk
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[...] = (30, 20, 10, 0)  # fully transparent: the colour is kept, not composited
    files = {
        "g.png": _png(np.full((4, 6), 77, np.uint8)),
        "g16.png": _png(gray16),
        "c16.png": _png(rgb16),
        "a.png": _png(bgra),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # benign only: no warning
        ds = _coco(tmp_path, files, [(k, f, 4, 6) for k, f in enumerate(files)], [(0, 1, [-2, 1, 5, 10])], strict=True)
    expected = [(77, 77, 77), (100, 100, 100), (255, 200, 10), (10, 20, 30)]  # RGB
    for i, rgb in enumerate(expected):
        image = ds[i]["image"]
        assert image.dtype == np.uint8 and image.shape == (4, 6, 3)
        assert (image == np.array(rgb, np.uint8)).all(), (i, image[0, 0])
    np.testing.assert_array_equal(ds[0]["boxes"], [[0, 1, 3, 4]])  # [-2, 1, 3, 11] clipped to 6 x 4
    counts = {"grayscale": 2, "high_bit_depth": 2, "alpha": 1, "box_clipped": 1, "no_boxes": 3}
    assert ds.report.counts == counts and ds.report.problems == {}


def test_clipping_gives_exact_numbers():
    report = CheckReport()
    boxes = np.array([[-5, 2, 50, 20], [10, -3, 20, 40], [1, 1, 2, 2], [45, 0, 60, 5], [5, 5, 5, 9], [0, 0, np.nan, 1]])
    out, labels = check_boxes(boxes, np.array([0, 1, 1, 0, 1, 1]), (30, 40), 2, report, "x.png")
    np.testing.assert_array_equal(out, np.array([[0, 2, 40, 20], [10, 0, 20, 30], [1, 1, 2, 2]], np.float32))
    assert out.dtype == np.float32 and labels.dtype == np.int64 and labels.tolist() == [0, 1, 1]
    assert report.counts == {"box_clipped": 2, "box_outside": 1, "box_empty": 1, "box_nonfinite": 1}


def test_trailing_bytes_after_jpeg_end_are_not_truncation(tmp_path):
    ds = _coco(
        tmp_path,
        {"good.png": GOOD, "pad.jpg": _jpg(NOISE) + b"\x00" * 50},
        [OK_IMAGE, (2, "pad.jpg", 64, 64)],
        [OK_BOX],
    )
    assert len(ds) == 2 and ds.report.problems == {}


def test_verify_decode_catches_corrupt_data_the_header_check_misses(tmp_path):
    data = bytearray(_png(NOISE))
    data[len(data) // 2] ^= 0xFF  # corrupt the compressed stream; the IEND chunk is intact
    files = {"good.png": GOOD, "bad.png": bytes(data)}
    ds = _coco(tmp_path, files, [OK_IMAGE, (2, "bad.png", 64, 64)], [OK_BOX])
    assert len(ds) == 2  # header mode trusts it
    with pytest.warns(UserWarning, match="truncated_image=1"):
        ds = CocoDetection(tmp_path / "img", tmp_path / "ann.json", verify="decode")
    assert ds.image_ids == [1]


def test_a_file_failing_at_load_time_is_replaced_by_the_next(tmp_path):
    files = {"good.png": GOOD, "b.png": _png(np.zeros((H, W, 3), np.uint8)), "c.png": GOOD}
    ds = _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W), (3, "c.png", H, W)], [OK_BOX])
    (tmp_path / "img" / "b.png").write_bytes(b"broken after the checks")
    (tmp_path / "img" / "c.png").unlink()
    with pytest.warns(UserWarning, match="using the next readable item") as record:
        assert ds[1]["image_id"] == 1  # 1 -> 2 (missing) -> 0, cyclically
    assert ["b.png" in str(w.message) for w in record] == [True, False] and "c.png" in str(record[1].message)
    assert ds.report.counts["load_failed"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no retry, no second warning
        assert ds[2]["image_id"] == 1 and ds[0]["image_id"] == 1
    (tmp_path / "img" / "good.png").unlink()
    with pytest.raises(DataError, match="none of its 3 images could be decoded"), pytest.warns(UserWarning):
        ds[0]


def test_strict_stops_at_load_time_too_and_the_cli_message_survives_a_worker(tmp_path):
    files = {"good.png": GOOD, "b.png": GOOD}
    ds = _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W)], [OK_BOX], strict=True)
    (tmp_path / "img" / "b.png").write_bytes(b"broken after the checks")
    message = r"bad input \(strict=True\): .*ann.json: image not found or unreadable: .*b.png .*\(load_failed\)$"
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, sampler=[1])
    with pytest.raises(DataError) as err:  # re-raised in this process with the worker's traceback in its text
        next(iter(loader))
    assert "Original Traceback" in str(err.value)
    assert re.fullmatch(message, data_error_message(err.value))  # what the CLI prints
    with pytest.raises(DataError, match=message):
        ds[1]
    assert ds.report.counts["load_failed"] == 1


def test_nothing_usable_is_an_error_even_when_not_strict(tmp_path):
    with pytest.raises(
        ValueError, match=r"(?s)no usable image \(check the paths\).*0 of 2 images kept.*missing_file=2"
    ):
        _coco(tmp_path, {}, [OK_IMAGE, (2, "gone.png", H, W)], [OK_BOX])


def test_datasets_pickle_for_spawned_workers(tmp_path):
    import pickle

    ds = _coco(tmp_path, {"good.png": GOOD}, [OK_IMAGE], [OK_BOX])
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy[0]["image"], ds[0]["image"]) and copy.report.counts == ds.report.counts


def test_examples_are_capped_and_kinds_are_known(tmp_path):
    images = [(k, f"gone{k}.png", H, W) for k in range(2, 6)]
    with pytest.warns(UserWarning, match="missing_file=4") as record:
        _coco(tmp_path, {"good.png": GOOD}, [OK_IMAGE, *images], [OK_BOX], max_examples=2)
    assert str(record[0].message).count("e.g.") == 2
    assert not set(PROBLEMS) & set(BENIGN)
    with pytest.raises(KeyError, match="unknown check kind"):
        CheckReport().add("typo", "x")


def test_yolo_bad_lines_nan_and_class_ids(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for stem in ("a", "b", "c"):
        (tmp_path / "images" / f"{stem}.png").write_bytes(GOOD)
    (tmp_path / "labels" / "c.txt").write_bytes(b"\xff\xfe\x00binary")  # counted, image kept as a negative
    lines = [
        "0 0.5 0.5 0.5 0.5",
        "2 0.5 0.5 0.1 0.1",
        "-1 0.5 0.5 0.1 0.1",
        "0 nan 0.5 0.1 0.1",
        "0 0.5 0.5",
        "x 1 1 1 1",
        "0.5 0.5 0.5 0.1 0.1",
    ]
    (tmp_path / "labels" / "a.txt").write_text("\n".join(lines))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "images", "names": ["p", "q"]}))
    with pytest.warns(UserWarning, match="problems: bad_annotation=4, box_nonfinite=1, class_out_of_range=2"):
        ds = YoloDetection(tmp_path / "d.yaml")
    np.testing.assert_allclose(ds[0]["boxes"], [[10, 7.5, 30, 22.5]])
    assert ds.report.counts["no_boxes"] == 2  # b.png has no label file: a negative
    with pytest.raises(ValueError, match=r"(?s)bad_annotation=4.*a.txt line 5: bad_annotation"):
        YoloDetection(tmp_path / "d.yaml", strict=True)


def test_voc_bad_and_missing_xml(tmp_path):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    for stem in ("1", "2", "3"):
        (tmp_path / "JPEGImages" / f"{stem}.jpg").write_bytes(_jpg(NOISE))
    box = "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax><ymax>8</ymax></bndbox>"
    (tmp_path / "Annotations" / "1.xml").write_text(
        f"<annotation><object><name>cat</name>{box}</object><object><name>dog</name></object></annotation>"
    )
    (tmp_path / "Annotations" / "2.xml").write_text("<annotation><object>")
    (tmp_path / "ImageSets/Main/train.txt").write_text("1\n2\n3\n")
    with pytest.warns(UserWarning, match="missing_file=1, bad_annotation=2"):
        ds = VocDetection(tmp_path, class_names=["cat"])
    assert ds.image_ids == [1] and ds[0]["boxes"].tolist() == [[0, 0, 8, 8]]
    with pytest.raises(ValueError, match=r"(?s)missing_file=1.*3.xml: missing_file"):
        VocDetection(tmp_path, strict=True)


def test_exif_orientation_is_applied_unless_the_annotation_is_in_the_stored_frame(tmp_path):
    from PIL import Image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:5, :5] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    Image.fromarray(stored).save(tmp_path / "images" / "r.png", exif=exif.tobytes())
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "images", "names": ["p"]}))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "r.txt").write_text("0 0.5 0.5 1 1\n")
    yolo = YoloDetection(tmp_path / "d.yaml")  # Ultralytics: labels are relative to the upright image
    image = yolo[0]["image"]
    assert yolo.sizes == [(40, 20)] and image.shape == (40, 20, 3) and yolo.report.counts["exif_orientation"] == 1
    assert (image[:5, 15:, 0] == 255).all() and image[5:, :, 0].max() == 0  # the patch is now top-right
    np.testing.assert_array_equal(yolo[0]["boxes"], [[0, 0, 20, 40]])
    files = {"r.png": (tmp_path / "images" / "r.png").read_bytes()}
    upright = _coco(tmp_path / "a", files, [(1, "r.png", 40, 20)], [])
    as_stored = _coco(tmp_path / "b", files, [(1, "r.png", 20, 40)], [])  # written by a tool ignoring EXIF
    assert upright[0]["image"].shape == (40, 20, 3) and upright.sizes == [(40, 20)]
    assert np.array_equal(as_stored[0]["image"], stored) and as_stored.sizes == [(20, 40)]
    assert "exif_orientation" not in as_stored.report.counts
    with pytest.warns(UserWarning, match="size_mismatch=1"):
        _coco(tmp_path / "c", {**files, "ok.png": GOOD}, [(1, "r.png", 25, 25), (2, "ok.png", H, W)], [])


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the SOS segment)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def _corrupt_jpegs() -> dict[str, bytes]:
    """A real JPEG, and two corrupt versions that still end with the end-of-image marker."""
    smooth = cv2.GaussianBlur(NOISE, (7, 7), 0)
    good = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    start, end = _scan_start(good), len(good) - 2  # scan data is good[start:end]
    cut = good[: start + (end - start) // 3] + b"\xff\xd9"  # cut short, end marker re-appended
    noisy = bytearray(good)
    middle = (start + end) // 2
    noisy[middle : middle + 32] = np.random.default_rng(1).integers(0, 256, 32, dtype=np.uint8).tobytes()
    return {"good.jpg": good, "cut.jpg": cut, "noisy.jpg": bytes(noisy)}


def test_verify_decode_catches_corrupt_jpeg_data_that_passes_every_other_check(tmp_path):
    files = _corrupt_jpegs()
    assert all(data.endswith(b"\xff\xd9") for data in files.values())  # the tail check cannot see it
    images = [(k, name, 64, 64) for k, name in enumerate(files, 1)]
    anns = [(k, 1, [1, 2, 10, 5]) for k in (1, 2, 3)]
    header = _coco(tmp_path, files, images, anns)  # header mode trusts them ...
    assert len(header) == 3 and header.report.problems == {}
    cut = header[1]["image"]  # ... and OpenCV decodes the cut file, with its lower part flat grey
    assert cut.shape == (64, 64, 3) and (cut[48:] == 128).all() and cut[:16].std() > 1
    with pytest.warns(UserWarning, match=r"1 of 3 images kept; problems: corrupt_image=2\b") as record:
        ds = CocoDetection(tmp_path / "img", tmp_path / "ann.json", verify="decode")
    assert ds.image_ids == [1] and ds.report.problems == {"corrupt_image": 2}
    examples = dict((where.split(" ")[0], where) for where, _ in ds.report.examples)
    assert examples.keys() == {"cut.jpg", "noisy.jpg"}  # named, with libjpeg's own words
    assert "Corrupt JPEG data" in examples["cut.jpg"] and "cut.jpg (" in str(record[0].message)
    with pytest.raises(DataError, match=r"(?s)bad input \(strict=True\).*corrupt_image=2.*cut.jpg \(Corrupt JPEG"):
        CocoDetection(tmp_path / "img", tmp_path / "ann.json", verify="decode", strict=True)


def test_verify_decode_accepts_every_kind_of_sound_jpeg(tmp_path):
    from PIL import Image

    smooth = cv2.GaussianBlur(NOISE, (7, 7), 0)
    variants = {
        "progressive.jpg": {"progressive": True, "optimize": True},
        "restarts.jpg": {"restart_marker_blocks": 2},
        "gray.jpg": {"mode": "L"},
        "cmyk.jpg": {"mode": "CMYK"},
    }
    files = {"trailing.jpg": _corrupt_jpegs()["good.jpg"] + b"\x00" * 50}  # bytes after the end: harmless
    for name, kwargs in variants.items():
        path = tmp_path / name
        Image.fromarray(smooth[..., ::-1]).convert(kwargs.pop("mode", "RGB")).save(path, "JPEG", **kwargs)
        files[name] = path.read_bytes()
    images = [(k, name, 64, 64) for k, name in enumerate(files, 1)]
    ds = _coco(tmp_path, files, images, [(1, 1, [1, 2, 10, 5])], verify="decode", strict=True)
    assert len(ds) == 5 and ds.report.problems == {}
    truncated = _corrupt_jpegs()["good.jpg"][:-300]  # cut without a new end marker: truncated, as in header mode
    (tmp_path / "img" / "trailing.jpg").write_bytes(truncated)
    with pytest.warns(UserWarning, match=r"problems: truncated_image=1\b"):
        CocoDetection(tmp_path / "img", tmp_path / "ann.json", verify="decode")


def test_a_split_without_any_box_is_reported(tmp_path):
    files = {"good.png": GOOD, "b.png": GOOD}
    with pytest.warns(UserWarning, match=r"problems: none\n  no box in any image: every image is a negative"):
        ds = _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W)], [])
    assert len(ds) == 2 and ds.report.counts == {"no_boxes": 2}
    with pytest.warns(UserWarning, match=r"problems: class_out_of_range=1\n  no box in any image") as record:
        _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W)], [(1, 9, [1, 2, 10, 5])])  # its only box: unknown class
    assert len(record) == 1  # one warning for both
    with pytest.raises(DataError, match=r"(?s)bad input \(strict=True\).*no box in any image"):
        _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W)], [], strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one box is enough
        _coco(tmp_path, files, [OK_IMAGE, (2, "b.png", H, W)], [OK_BOX], strict=True)


def test_yolo_label_files_without_an_image_are_counted(tmp_path):
    for folder in ("images/train/sub", "labels/train/sub", "images/val", "labels/val"):
        (tmp_path / folder).mkdir(parents=True)
    for stem in ("train/a", "train/sub/b", "val/c"):
        (tmp_path / "images" / f"{stem}.png").write_bytes(GOOD)
        (tmp_path / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "images/train/d.gif").write_bytes(b"GIF89a")  # not an image suffix the reader loads
    (tmp_path / "labels/train/d.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "labels/train/sub/gone.txt").write_text("0 0.5 0.5 0.5 0.5\n")  # its image was deleted
    (tmp_path / "labels/train/classes.txt").write_text("p\n")  # a class list some tools write: not a label
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["p"]}))
    with pytest.warns(UserWarning, match=r"2 of 2 images kept; problems: orphan_label=2\b") as record:
        ds = YoloDetection(tmp_path / "d.yaml", "train")
    assert len(ds) == 2 and [len(b) for b in ds.boxes] == [1, 1]
    assert "labels/train/d.txt: orphan_label" in str(record[0].message)
    assert "labels/train/sub/gone.txt: orphan_label" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the val split's label folder holds only its own labels
        assert len(YoloDetection(tmp_path / "d.yaml", "val", strict=True)) == 1
    with pytest.raises(DataError, match=r"(?s)strict=True.*orphan_label=2"):
        YoloDetection(tmp_path / "d.yaml", "train", strict=True)
