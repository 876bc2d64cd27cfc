"""COCO, YOLO and VOC readers: the same annotations written in each format read back the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from detector.data.readers.base import IMAGE_SUFFIXES
from detector.data.readers.folder import ImageFolder
from detector.data.readers.formats import open_dataset
from detector.data.readers.voc import VocDetection
from detector.data.readers.yolo import YoloDetection, label_path
from detector.data.shapes import SHAPES_CLASSES, ShapesConfig, ensure_shapes

TINY = ShapesConfig(num_train=5, num_val=3, seed=1, min_size=64, max_size=96)


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def write_yolo(coco: dict, images: Path, out: Path, split: str) -> None:
    """images/<split>/x.jpg + labels/<split>/x.txt (``label cx cy w h`` normalised); no file for an empty image."""
    label_of = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    (out / "images" / split).mkdir(parents=True)
    for im in coco["images"]:
        dst = out / "images" / split / im["file_name"]
        shutil.copy(images / im["file_name"], dst)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        if anns:
            W, H = im["width"], im["height"]
            lines = [
                f"{label_of[a['category_id']]} {(x + w / 2) / W!r} {(y + h / 2) / H!r} {w / W!r} {h / H!r}"
                for a in anns
                for x, y, w, h in [a["bbox"]]
            ]
            label_path(dst).parent.mkdir(parents=True, exist_ok=True)
            label_path(dst).write_text("\n".join(lines) + "\n")


def write_voc(coco: dict, images: Path, out: Path, split: str) -> None:
    """Annotations/x.xml (1-based bndbox: xmin = x + 1, xmax = x + w), JPEGImages/x.jpg, ImageSets/Main/<split>.txt."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    stems = []
    for im in coco["images"]:
        stem = f"{split}_{Path(im['file_name']).stem}"  # both shapes splits start at 000000.jpg
        stems.append(stem)
        shutil.copy(images / im["file_name"], out / "JPEGImages" / f"{stem}.jpg")
        objects = "".join(
            f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox><xmin>{x + 1!r}</xmin>"
            f"<ymin>{y + 1!r}</ymin><xmax>{x + w!r}</xmax><ymax>{y + h!r}</ymax></bndbox></object>"
            for a in coco["annotations"]
            if a["image_id"] == im["id"]
            for x, y, w, h in [a["bbox"]]
        )
        size = f"<size><width>{im['width']}</width><height>{im['height']}</height><depth>3</depth></size>"
        xml = f"<annotation><filename>{stem}.jpg</filename>{size}{objects}</annotation>"
        (out / "Annotations" / f"{stem}.xml").write_text(xml)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


@pytest.fixture(scope="module")
def three_formats(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats")
    root = ensure_shapes(base / "coco", TINY)
    for split in ("train", "val"):
        coco = _coco(root, split)
        last = coco["images"][-1]["id"]  # make sure one image has no box
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != last]
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        write_yolo(coco, root / split, base / "yolo", split)
        write_voc(coco, root / split, base / "voc", split)
    names = dict(enumerate(c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])))
    (base / "yolo" / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names})
    )
    return {"coco": root, "yolo": base / "yolo", "voc": base / "voc"}


@pytest.mark.parametrize("split", ["train", "val"])
def test_all_formats_read_the_same_boxes(three_formats, split):
    coco = open_dataset("coco", three_formats["coco"], split)
    yolo = open_dataset("yolo", three_formats["yolo"], split)  # a folder holding one YAML
    voc = open_dataset("voc", three_formats["voc"], split)
    n = TINY.num_train if split == "train" else TINY.num_val
    assert len(coco) == len(yolo) == len(voc) == n
    assert coco.class_names == yolo.class_names == list(SHAPES_CLASSES)
    raw = _coco(three_formats["coco"], split)
    present = {
        c["id"]: c["name"] for c in raw["categories"] if any(a["category_id"] == c["id"] for a in raw["annotations"])
    }
    assert voc.class_names == sorted(present.values())  # from the XMLs' <name>s, sorted
    assert coco.category_ids == [1, 2, 3, 5, 8] and yolo.category_ids == [0, 1, 2, 3, 4]
    assert voc.category_ids == list(range(len(present)))
    assert coco.sizes == yolo.sizes == voc.sizes and yolo.image_ids == list(range(n))
    for i in range(n):
        c, y, v = coco[i], yolo[i], voc[i]
        assert np.array_equal(c["image"], y["image"]) and np.array_equal(c["image"], v["image"])
        np.testing.assert_allclose(y["boxes"], c["boxes"], atol=1e-3)  # via the normalised text
        np.testing.assert_allclose(v["boxes"], c["boxes"], atol=1e-4)
        assert y["labels"].tolist() == c["labels"].tolist()
        assert [voc.class_names[k] for k in v["labels"]] == [coco.class_names[k] for k in c["labels"]]
        ids = [a["category_id"] for a in raw["annotations"] if a["image_id"] == c["image_id"]]
        assert [coco.category_ids[k] for k in c["labels"]] == ids  # labels map back to the COCO ids
    assert len(coco[n - 1]["boxes"]) == len(yolo[n - 1]["boxes"]) == len(voc[n - 1]["boxes"]) == 0
    assert coco.report.problems == yolo.report.problems == voc.report.problems == {}
    assert coco.report.counts["no_boxes"] == yolo.report.counts["no_boxes"] == voc.report.counts["no_boxes"] >= 1


def test_val_takes_the_training_mapping(three_formats):
    for fmt in ("coco", "yolo", "voc"):
        train = open_dataset(fmt, three_formats[fmt], "train")
        val = open_dataset(
            fmt, three_formats[fmt], "val", category_ids=train.category_ids, class_names=train.class_names
        )
        assert (val.class_names, val.category_ids) == (train.class_names, train.category_ids)
    voc = VocDetection(three_formats["voc"], "val", class_names=list(SHAPES_CLASSES))  # explicit list, COCO order
    coco = open_dataset("coco", three_formats["coco"], "val")
    assert [voc[i]["labels"].tolist() for i in range(len(voc))] == [
        coco[i]["labels"].tolist() for i in range(len(coco))
    ]


def test_yolo_yaml_variants(three_formats, tmp_path):
    root = three_formats["yolo"]
    (root / "val.txt").write_text("./images/val/000001.jpg\n./images/val/000000.jpg\n")  # a list keeps its order
    data = {"path": str(root), "train": ["images/train"], "val": "val.txt", "names": list(SHAPES_CLASSES), "nc": 5}
    (tmp_path / "list.yaml").write_text(yaml.safe_dump(data))
    ds = YoloDetection(tmp_path / "list.yaml", "val")
    assert [p.name for p in ds.paths] == ["000001.jpg", "000000.jpg"] and ds.image_ids == [1, 0]
    assert len(YoloDetection(tmp_path / "list.yaml", "train")) == TINY.num_train
    for bad, match in [
        ({**data, "nc": 4}, "nc=4 but names has 5"),
        ({**data, "names": {0: "a", 2: "b"}}, r"names keys must be 0..1"),
        ({k: v for k, v in data.items() if k != "names"}, "lacks 'names'"),
    ]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=match):
            YoloDetection(tmp_path / "bad.yaml", "val")
    with pytest.raises(ValueError, match=r"has no split 'test'"):
        YoloDetection(tmp_path / "list.yaml", "test")


def test_yolo_segments_and_label_paths(tmp_path):
    assert label_path(Path("/d/images/x/images/a.b.jpg")) == Path("/d/images/x/labels/a.b.txt")  # the last /images/
    assert label_path(Path("/d/pics/a.png")) == Path("/d/pics/a.txt")
    (tmp_path / "images").mkdir()
    import cv2

    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((50, 100, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.8\n\n0 0.5 0.5 0.2 0.4\n")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "images", "names": ["p", "q"]}))
    s = YoloDetection(tmp_path / "d.yaml", "train")[0]
    np.testing.assert_allclose(s["boxes"], [[10, 10, 50, 40], [40, 15, 60, 35]], atol=1e-5)
    assert s["labels"].tolist() == [1, 0]


def test_one_list_of_image_suffixes(tmp_path):
    """The YOLO reader and the predict folder list the same files: every suffix of ``IMAGE_SUFFIXES``, in any
    case, and nothing else; each decodes to its pixels (exactly, for the lossless formats)."""
    import cv2

    assert IMAGE_SUFFIXES == (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
    yy, xx = np.mgrid[:24, :32]
    image = np.stack([xx * 8, yy * 10, np.full_like(xx, 128)], -1).astype(np.uint8)  # RGB, smooth (JPEG keeps it)
    folder = tmp_path / "images" / "train"
    (tmp_path / "labels" / "train").mkdir(parents=True)
    folder.mkdir(parents=True)
    names = []
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        names.append(f"{i}{suffix.upper() if i % 2 else suffix}")
        params = [cv2.IMWRITE_WEBP_QUALITY, 101] if suffix == ".webp" else []  # > 100: lossless WebP
        ok, data = cv2.imencode(".jpg" if suffix == ".mpo" else suffix, image[..., ::-1], params)  # MPO: JPEG data
        (folder / names[-1]).write_bytes(data.tobytes())
        (tmp_path / "labels" / "train" / f"{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    for other in ("notes.txt", "clip.gif", "scan.jp2"):
        (folder / other).write_bytes(b"not listed")
    predict = ImageFolder(folder)
    assert predict.file_names == sorted(names)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["p"]}))
    yolo = YoloDetection(tmp_path / "d.yaml", "train", strict=True)
    assert sorted(p.name for p in yolo.paths) == sorted(names)
    for name in names:
        got = predict.load_image(predict.file_names.index(name))
        assert (got == yolo.load_image([p.name for p in yolo.paths].index(name))).all()
        lossy = name.lower().endswith((".jpg", ".jpeg", ".mpo"))
        assert np.abs(got.astype(int) - image).max() <= 16 if lossy else (got == image).all(), name


def test_voc_difficult_objects_and_edges(tmp_path):
    import cv2

    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "JPEGImages" / "2008_000123.jpg"), np.zeros((20, 30, 3), np.uint8))
    obj = "<object><name>{}</name><difficult>{}</difficult><bndbox><xmin>{}</xmin><ymin>1</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object>"
    xml = (
        "<annotation><size><width>30</width><height>20</height></size>"
        + obj.format("dog", 0, 1)
        + obj.format("cat", 1, 11)
        + "</annotation>"
    )
    (tmp_path / "Annotations" / "2008_000123.xml").write_text(xml)
    (tmp_path / "ImageSets/Main/train.txt").write_text("2008_000123\n")
    ds = VocDetection(tmp_path)
    assert ds.class_names == ["cat", "dog"] and ds.image_ids == [2008000123] and ds.report.counts["difficult"] == 1
    np.testing.assert_array_equal(ds[0]["boxes"], [[0, 0, 30, 20]])  # 1-based inclusive -> pixel edges
    kept = VocDetection(tmp_path, keep_difficult=True)[0]
    np.testing.assert_array_equal(kept["boxes"], [[0, 0, 30, 20], [10, 0, 30, 20]])
    assert kept["labels"].tolist() == [1, 0]


def test_open_dataset_rejects_bad_arguments(three_formats, tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset format 'csv'; choose one of \['coco', 'yolo', 'voc'\]"):
        open_dataset("csv", three_formats["coco"], "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="yolo: images/annotations are not used"):
        open_dataset("yolo", three_formats["yolo"], "train", images="images/train")
    with pytest.raises(FileNotFoundError, match="holds 0 dataset YAMLs"):
        open_dataset("yolo", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"VOC split list not found: .*ImageSets/Main/test.txt"):
        open_dataset("voc", three_formats["voc"], "test")
    with pytest.raises(ValueError, match=r"category_ids must be 0..4"):
        open_dataset("voc", three_formats["voc"], "val", category_ids=[1, 2, 3, 5, 8], class_names=SHAPES_CLASSES)
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*annotations/test.json"):
        open_dataset("coco", three_formats["coco"], "test")
