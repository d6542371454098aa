"""Data folders built to mislead or exhaust the listing: symlinks that would give an image two labels, a
folder nested deeper than Python's recursion limit, an image whose pixels would fill the memory, a val/ tree
that lacks a class."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from edgetl.data import scan_folder
from edgetl.errors import UserError


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i:03d}.png")
    return root


def _listed(listing) -> dict[str, str]:
    """Every listed file with its label, over all splits."""
    return {p: listing.classes[y] for records in listing.splits.values() for p, y in records}


# ------------------------------------------------------------------------------ deep folders


def _remove_chain(top: str, depth: int) -> None:
    """Remove a chain of folders named "d" below `top`, deepest first: shutil.rmtree recurses once per level."""
    chain = os.path.join(top, *["d"] * depth)
    for name in os.listdir(chain):
        os.remove(os.path.join(chain, name))
    for _ in range(depth):
        os.rmdir(chain)
        chain = os.path.dirname(chain)


def test_a_folder_nested_1500_levels_deep_is_listed_without_recursion() -> None:
    # outside pytest's tmp_path, whose clean-up (shutil.rmtree) cannot remove 1500 levels
    root = _tree(Path(tempfile.mkdtemp(prefix="edgetl-deep-")), {"cat": 5, "dog": 5})
    deep = str(root / "dog")
    try:
        for _ in range(1500):  # level by level: os.makedirs recurses once per missing level too
            deep = os.path.join(deep, "d")
            os.mkdir(deep)
        Image.new("RGB", (8, 8)).save(os.path.join(deep, "bottom.png"))
        listing = scan_folder(root)
    finally:
        _remove_chain(str(root / "dog"), deep.count(os.sep) - str(root / "dog").count(os.sep))
        shutil.rmtree(root)
    listed = _listed(listing)
    bottom = "dog/" + "d/" * 1500 + "bottom.png"
    assert listed[bottom] == "dog" and len(listed) == 11
    assert not listing.skipped


# ------------------------------------------------------------------------------ symlinks and labels


def _reasons(listing) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in listing.skipped}


def test_a_link_to_the_data_root_inside_a_class_gives_no_image_a_second_label(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5, "c2": 5})
    (root / "c0" / "up").symlink_to("..")
    listing = scan_folder(root)
    listed = _listed(listing)
    assert len(listed) == 15 and all(path.split("/")[0] == label for path, label in listed.items())
    assert listing.counts()["train"] == {"c0": 3, "c1": 3, "c2": 3}
    assert _reasons(listing)["c0/up"].startswith("symlink leaves its class folder")


def test_links_to_files_of_another_class_or_outside_the_data_are_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"c0": 5, "c1": 5})
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    (root / "c0" / "theirs.png").symlink_to(root / "c1" / "000.png")
    (root / "c0" / "outside.png").symlink_to(tmp_path / "elsewhere.png")
    (root / "c1" / "sub").symlink_to(tmp_path)  # a folder above the data root
    listing = scan_folder(root)
    assert set(_listed(listing)) == {f"c{c}/{i:03d}.png" for c in (0, 1) for i in range(5)}
    reasons = _reasons(listing)
    for link in ("c0/theirs.png", "c0/outside.png", "c1/sub"):
        assert reasons[link].startswith("symlink leaves its class folder"), link
    assert set(reasons) == {"c0/theirs.png", "c0/outside.png", "c1/sub"}


def test_a_file_reached_twice_in_its_class_is_listed_once_at_its_own_place(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"cat": 5, "dog": 5})
    (root / "dog" / "also.png").symlink_to("004.png")
    (root / "dog" / "alias").symlink_to("sub")  # sorts before the folder it reaches
    (root / "dog" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "sub" / "x.png")
    (root / "dog" / "sub" / "back").symlink_to("..")  # a loop, inside the class
    (root / "cat" / ".store").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / ".store" / "kept.png")
    (root / "cat" / "kept.png").symlink_to(".store/kept.png")  # reaches a file once: taken
    os.link(root / "cat" / "000.png", root / "cat" / "hard.png")
    listing = scan_folder(root)
    listed = _listed(listing)
    assert "dog/sub/x.png" in listed and "cat/kept.png" in listed and "cat/000.png" in listed
    assert len(listed) == 12
    reasons = _reasons(listing)
    assert reasons["dog/also.png"].startswith("the same file as 'dog/004.png'")
    assert reasons["dog/alias"].startswith("symlink to the folder 'dog/sub', already listed")
    assert reasons["dog/sub/back"].startswith("symlink loop")
    assert reasons["cat/hard.png"].startswith("the same file as 'cat/000.png'")


def test_a_hard_link_in_two_classes_is_skipped_in_both(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5})
    os.link(root / "c0" / "000.png", root / "c1" / "same.png")
    listing = scan_folder(root)
    assert "c0/000.png" not in _listed(listing) and "c1/same.png" not in _listed(listing)
    reasons = _reasons(listing)
    for path in ("c0/000.png", "c1/same.png"):
        assert "cannot carry two labels" in reasons[path]


@pytest.mark.parametrize(("link", "target", "needle"), [
    ("c3", "c1", "class folder 'c3' is a symlink to class folder 'c1'"),
    ("c3", "c1/sub", "class folder 'c3' is a symlink into class folder 'c1'"),
    ("all", ".", "class folder 'all' is a symlink to a folder that holds class folder 'c0'"),
])
def test_a_class_folder_that_is_a_symlink_to_another_class_is_refused(
    tmp_path: Path, link: str, target: str, needle: str
) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5, "c1/sub": 3})
    (root / link).symlink_to(target)
    with pytest.raises(UserError) as caught:
        scan_folder(root)
    message = str(caught.value)
    assert needle in message and "two labels" in message and "\n" not in message


def test_a_class_folder_that_is_a_symlink_elsewhere_is_a_class(tmp_path: Path) -> None:
    _tree(tmp_path / "photos", {"birds": 5})
    root = _tree(tmp_path / "data", {"c0": 5})
    (root / "birds").symlink_to(tmp_path / "photos" / "birds")
    listing = scan_folder(root)
    assert listing.classes == ["birds", "c0"] and len(_listed(listing)) == 10 and not listing.skipped


def test_train_val_test_trees_take_the_same_rule(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 6})
    _tree(tmp_path / "val", {"a": 3, "b": 3})
    (tmp_path / "val" / "a" / "leak.png").symlink_to("../../train/a/000.png")
    os.link(tmp_path / "train" / "b" / "000.png", tmp_path / "val" / "b" / "hard.png")
    (tmp_path / "val" / "b" / "up").symlink_to("../../train")
    listing = scan_folder(tmp_path)
    assert len(listing.splits["val"]) == 6 and all(p.startswith("val/") for p, _ in listing.splits["val"])
    reasons = _reasons(listing)
    assert reasons["val/a/leak.png"].startswith("symlink leaves its class folder")
    assert reasons["val/b/hard.png"].startswith("the same file as 'train/b/000.png'")
    assert reasons["val/b/up"].startswith("symlink leaves its class folder")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a").symlink_to("../train/a")
    with pytest.raises(UserError, match="class folder 'test/a' is a symlink to class folder 'train/a'.*two splits"):
        scan_folder(tmp_path)


# ------------------------------------------------------------------------------ a split that lacks a class


def test_a_val_or_test_tree_that_lacks_a_class_is_warned_about_and_recorded(tmp_path: Path, capsys) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    _tree(tmp_path / "val", {"a": 2, "b": 2})  # no c/ at all
    _tree(tmp_path / "test", {"a": 2, "b": 2, "c": 0})  # c/ there but empty
    listing = scan_folder(tmp_path)
    assert listing.classes == ["a", "b", "c"]
    assert listing.counts()["val"]["c"] == 0 and listing.counts()["test"]["c"] == 0
    assert len(listing.warnings) == 2
    assert listing.warnings[0].startswith("val/ has no image of class 'c'")
    assert listing.warnings[1].startswith("test/ has no image of class 'c'")
    err = capsys.readouterr().err
    assert "warning: val/ has no image of class 'c'" in err and "warning: test/ has no image of class 'c'" in err
    _tree(tmp_path / "val", {"c": 2})
    _tree(tmp_path / "test", {"c": 2})
    assert scan_folder(tmp_path).warnings == []
