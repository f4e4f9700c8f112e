from __future__ import annotations

import json

import numpy as np
import pytest

from qshift.data.collection import Collection, load_collection
from qshift.errors import InputError


def test_image_folder_with_captions_csv(image_collection):
    coll = load_collection(image_collection)
    assert len(coll) == 12 and coll.has_images
    assert all(len(c) == 2 for c in coll.captions)
    assert coll.image_paths[0].is_file()
    assert coll.caption_item().tolist()[:4] == [0, 0, 1, 1]
    assert coll.item_captions()[1].tolist() == [2, 3]
    assert coll.text_ids()[:2] == [f"{coll.ids[0]}#0", f"{coll.ids[0]}#1"]


def test_jsonl_with_caption_lists_and_strings(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"image": "a.jpg", "captions": ["one", "two"]}\n\n{"image": "b.jpg", "caption": "three"}\n')
    coll = load_collection(p)
    assert coll.ids == ["a.jpg", "b.jpg"] and coll.captions == [["one", "two"], ["three"]]
    assert not coll.has_images


def test_karpathy_json(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "cocoid": 7,
         "sentences": [{"raw": "a cat "}, {"raw": "a kitten"}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "train", "cocoid": 8, "sentences": [{"raw": "dog"}]}]}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(data))
    coll = load_collection(p, image_root=tmp_path)
    assert coll.ids == ["7"] and coll.captions == [["a cat", "a kitten"]]
    assert coll.image_paths == [tmp_path / "val2014" / "x.jpg"]
    assert load_collection(p, split="train").ids == ["8"]
    with pytest.raises(InputError, match="no image in split 'val'.*test"):
        load_collection(p, split="val")


def test_coco_captions_json(tmp_path):
    data = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
            "annotations": [{"id": 10, "image_id": 2, "caption": "b"}, {"id": 11, "image_id": 1, "caption": "a"},
                            {"id": 12, "image_id": 1, "caption": "a2"}]}
    p = tmp_path / "captions_val.json"
    p.write_text(json.dumps(data))
    coll = load_collection(p)
    assert coll.ids == ["1", "2"] and coll.captions == [["a", "a2"], ["b"]]
    data["images"].append({"id": 1, "file_name": "dup.jpg"})
    p.write_text(json.dumps(data))
    with pytest.raises(InputError, match="duplicate image id 1"):
        load_collection(p)


def test_line_per_caption_layout(tmp_path):
    p = tmp_path / "captions.txt"
    p.write_text("\n".join(f"caption {i}" for i in range(10)) + "\n")
    coll = load_collection(p, captions_per_item=5)
    assert len(coll) == 2 and coll.captions[1][0] == "caption 5"
    with pytest.raises(InputError, match="not a multiple of 3"):
        load_collection(p, captions_per_item=3)


def test_shared_coco_layout(shared_data):
    coll = load_collection(shared_data / "coco-5k-test" / "captions.txt")
    assert len(coll) == 5000 and len(coll.texts()) == 25000


@pytest.mark.parametrize("content, message", [
    ("image,caption\na.jpg,hello\nb.jpg,   \n", r"row 3 \(b.jpg\) has an empty caption"),
    ("img,text\na.jpg,hello\n", "expected a header with columns 'image,caption'"),
    ("image,caption\n,hello\n", "row 2 has no image name"),
])
def test_bad_csv(tmp_path, content, message):
    p = tmp_path / "captions.csv"
    p.write_text(content)
    with pytest.raises(InputError, match=message):
        load_collection(p)


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(InputError, match="nope.csv: collection not found"):
        load_collection(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(InputError, match="cannot tell the collection format"):
        load_collection(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="unknown collection format 'xml'"):
        load_collection(tmp_path / "x.parquet", fmt="xml")
    with pytest.raises(InputError, match="no captions.csv"):
        load_collection(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        load_collection(bad)
    csv = tmp_path / "x.csv"
    csv.write_text("image,caption\na,b\n")
    with pytest.raises(InputError, match="missing: image folder not found"):
        load_collection(csv, image_root=tmp_path / "missing")


def test_duplicate_ids_and_empty_captions_in_code():
    with pytest.raises(InputError, match="duplicate item id 'a'"):
        Collection("c", ["a", "a"], [["x"], ["y"]])
    with pytest.raises(InputError, match="item 'b' caption #1 is empty"):
        Collection("c", ["a", "b"], [["x"], ["y", " "]])
    with pytest.raises(InputError, match="item 'a' has no caption"):
        Collection("c", ["a"], [[]])


def test_subset_and_key():
    coll = Collection("c", ["a", "b", "c"], [["x"], ["y"], ["z"]])
    assert coll.subset(2).ids == ["a", "b"]
    assert coll.key() != coll.subset(2).key()
    assert np.array_equal(coll.caption_item(), [0, 1, 2])
