"""CocoDetection: category mapping, crowd handling, sample contract, counted skips, clear errors."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from detector.data.readers.coco import CocoDetection


def _write(tmp_path, coco: dict | str, with_images: bool = True):
    images = tmp_path / "images"
    if with_images:
        images.mkdir()
        for w, h, name, bgr in ((40, 30, "a.jpg", (0, 0, 255)), (20, 50, "b.png", (255, 0, 0))):
            cv2.imwrite(str(images / name), np.full((h, w, 3), bgr, np.uint8))
    ann = tmp_path / "ann.json"
    ann.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return images, ann


COCO = {
    "images": [
        {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
        {"id": 20, "file_name": "b.png", "width": 20, "height": 50},
    ],
    "annotations": [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 11, "bbox": [30, 20, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
    ],
    "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}, {"id": 11, "name": "c"}],
}


def _open(tmp_path, coco=COCO, **kwargs) -> CocoDetection:
    """COCO above has a zero-width box (annotation 4): one warning with the counts."""
    with pytest.warns(UserWarning, match="box_empty=1") as record:
        ds = CocoDetection(*_write(tmp_path, coco), **kwargs)
    assert len(record) == 1
    return ds


def test_non_contiguous_ids_map_to_sorted_labels(tmp_path):
    ds = _open(tmp_path)
    assert ds.category_ids == [3, 7, 11] and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert len(ds) == 2
    s = ds[0]
    assert s["image_id"] == 10 and s["image"].dtype == np.uint8 and s["image"].shape == (30, 40, 3)
    assert s["boxes"].dtype == np.float32 and s["labels"].dtype == np.int64
    # crowd (id 3) and the zero-width box (id 4) are skipped; box 2 is clipped to the 40x30 image
    np.testing.assert_allclose(s["boxes"], [[1, 2, 11, 7], [30, 20, 40, 30]])
    np.testing.assert_array_equal(s["labels"], [1, 2])
    # the per-image arrays, read without decoding; sizes from the image headers
    assert ds.sizes == [(30, 40), (50, 20)] and ds.file_names == ["a.jpg", "b.png"]
    np.testing.assert_array_equal(ds.boxes[0], s["boxes"])
    np.testing.assert_array_equal(ds.labels[0], s["labels"])
    assert ds.report.counts == {"crowd": 1, "box_empty": 1, "box_clipped": 1, "no_boxes": 1}


def test_images_are_rgb_and_empty_images_have_shaped_arrays(tmp_path):
    ds = _open(tmp_path)
    r, g, b = (int(v) for v in ds[0]["image"][0, 0])  # written as BGR red, lossy jpeg
    assert r > 240 and g < 15 and b < 15
    s = ds[1]
    assert tuple(s["image"][0, 0]) == (0, 0, 255)  # blue, lossless png
    assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)


def test_forced_mapping_keeps_training_labels(tmp_path):
    ds = _open(tmp_path, category_ids=[11, 7, 3, 99])
    assert ds.class_names == ["c", "b", "a", "99"]
    np.testing.assert_array_equal(ds[0]["labels"], [1, 0])
    with pytest.raises(ValueError, match=r"category ids \[3\] that the training categories"):
        CocoDetection(tmp_path / "images", tmp_path / "ann.json", category_ids=[7, 11])


def test_missing_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        CocoDetection(tmp_path / "images", tmp_path / "nope.json")


def test_missing_image_folder(tmp_path):
    _, ann = _write(tmp_path, COCO, with_images=False)
    with pytest.raises(FileNotFoundError, match="image folder not found: .*images"):
        CocoDetection(tmp_path / "images", ann)


def test_not_json(tmp_path):
    with pytest.raises(ValueError, match="annotation file is not valid JSON: .*ann.json"):
        CocoDetection(*_write(tmp_path, "images: [1, 2"))


@pytest.mark.parametrize("content", [{"images": [], "annotations": []}, [1, 2, 3]])
def test_json_without_coco_keys(tmp_path, content):
    with pytest.raises(ValueError, match=r"annotation file is not COCO format: .*lacks keys \[.*'categories'\]"):
        CocoDetection(*_write(tmp_path, content))


def test_missing_image_file_is_skipped_and_named(tmp_path):
    coco = {**COCO, "images": COCO["images"] + [{"id": 30, "file_name": "gone.jpg", "width": 5, "height": 5}]}
    with pytest.warns(UserWarning, match=r"2 of 3 images kept; problems: missing_file=1, box_empty=1") as record:
        ds = CocoDetection(*_write(tmp_path, coco))
    assert "gone.jpg: missing_file" in str(record[0].message)
    assert ds.image_ids == [10, 20] and ds.report.images_listed == 3 and ds.report.images_kept == 2
    with pytest.raises(ValueError, match=r"(?s)strict=True.*missing_file=1.*gone.jpg: missing_file - file not found"):
        CocoDetection(tmp_path / "images", tmp_path / "ann.json", strict=True)


def test_unknown_category_in_annotation_is_counted(tmp_path):
    coco = {
        **COCO,
        "annotations": COCO["annotations"] + [{"id": 9, "image_id": 10, "category_id": 5, "bbox": [0, 0, 2, 2]}],
    }
    with pytest.warns(UserWarning, match="class_out_of_range=1"):
        ds = CocoDetection(*_write(tmp_path, coco))
    np.testing.assert_array_equal(ds.labels[0], [1, 2])  # the category-5 box is dropped
    with pytest.raises(ValueError, match="(?s)class_out_of_range=1.*a.jpg: class_out_of_range"):
        CocoDetection(tmp_path / "images", tmp_path / "ann.json", strict=True)


def test_bad_annotation_entries_are_counted(tmp_path):
    anns = [
        {"id": 20, "image_id": 99, "category_id": 7, "bbox": [0, 0, 2, 2]},  # no such image
        {"id": 21, "image_id": 10, "category_id": 7, "bbox": [0, 0, 2]},  # 3 numbers
        {"id": 22, "image_id": 10, "category_id": 7, "bbox": ["a", 0, 2, 2]},
    ]
    coco = {**COCO, "annotations": COCO["annotations"][:2] + anns}
    with pytest.warns(UserWarning, match="bad_annotation=3") as record:
        ds = CocoDetection(*_write(tmp_path, coco))
    assert "ann.json annotation 20" in str(record[0].message)
    np.testing.assert_array_equal(ds.labels[0], [1, 2])


def test_a_repeated_image_id_never_lends_boxes_to_another_image(tmp_path):
    """Id 10 is listed for a.jpg and for b.png (as a corrupted file has it): whose boxes are the
    annotations of id 10? Neither image can be trusted, so both are skipped and the annotations
    counted, never attached to a kept image. Id 30 is c.jpg listed twice: one image, its own boxes."""
    images, ann = _write(tmp_path, "{}")
    cv2.imwrite(str(images / "c.jpg"), np.zeros((30, 40, 3), np.uint8))
    coco = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 30, "file_name": "c.jpg", "width": 40, "height": 30},
            {"id": 10, "file_name": "b.png", "width": 20, "height": 50},
            {"id": 30, "file_name": "c.jpg", "width": 40, "height": 30},
        ],
        "annotations": [  # 3 boxes of a.jpg, 3 of b.png, 2 of c.jpg
            *({"id": k, "image_id": 10, "category_id": 7, "bbox": [k, k, 5, 5]} for k in range(6)),
            {"id": 6, "image_id": 30, "category_id": 11, "bbox": [1, 2, 3, 4]},
            {"id": 7, "image_id": 30, "category_id": 7, "bbox": [10, 10, 20, 10]},
        ],
        "categories": COCO["categories"],
    }
    ann.write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match=r"1 of 4 images kept; problems: duplicate_image_id=3, ambiguous_annotation=6"):
        ds = CocoDetection(images, ann)
    assert ds.image_ids == [30] and ds.file_names == ["c.jpg"]
    np.testing.assert_array_equal(ds[0]["boxes"], [[1, 2, 4, 6], [10, 10, 30, 20]])  # exactly its own two
    np.testing.assert_array_equal(ds[0]["labels"], [2, 1])
    assert "ann.json annotation 0 (image_id 10 is listed for 2 files)" in dict(ds.report.examples)
