"""Files and config strings from outside: no pickle runs code, no path escapes or breaks a command.

Every loader of a file a user may have downloaded is fed one whose pickle would create a marker
file when unpickled; each must refuse it without creating the marker. The package source is checked
(on its syntax tree) for any way of unpickling that could run such code. Images are decoded only as
their extension says, checked against the manifest's hash when read again, and links and special
files in an image folder are followed or named by the folder's rules (digit/runtime/folder.py).
"""
import ast
import contextlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import EpsImagePlugin, Image
from test_metrics import inception_weights, write_samples  # noqa: F401 (inception_weights is a fixture)
from test_train import caches, interrupt_at  # noqa: F401 (caches is a fixture)
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

import digit.generate.train
from digit.data.prepare import run_prepare
from digit.data.synthetic import run_synthesize
from digit.evaluate.cas import run_train_classifier
from digit.evaluate.fidelity import (
    NpzImages,
    check_inception_weights,
    reference_cache_name,
    run_evaluate,
    val_reference_record,
)
from digit.generate.train import learning_rate, run_train_ar
from digit.pixels.losses import load_vgg16_features
from digit.pixels.weights import read_state_dict
from digit.runtime.config import ConfigError, validate
from digit.runtime.images import BadImage, ImageChanged, ImageDataset, count_images, load_image, load_manifest
from digit.runtime.io import read_json, sha256_file
from digit.tokenizer.encoders import create_model
from digit.tokenizer.features import CropFlipViews

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls Path.touch on the marker: the proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload-ran"


@pytest.fixture
def evil(tmp_path, marker):
    """A checkpoint of real tensors with the payload beside them."""
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def test_the_payload_is_live(evil, marker):
    """Without weights_only the checkpoint does run its code: the tests below would notice."""
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_encoder_weights_file_is_refused_unrun(tiny_config, evil, marker):
    tiny_config["encoder"].update(weights="file", weights_file=str(evil))
    with pytest.raises(ValueError, match=r"evil.pth \(encoder.weights_file\) holds Python objects.*not unpickled"):
        create_model(tiny_config)
    assert not marker.exists()


def test_vqgan_weights_file_is_refused_unrun(evil, marker):
    with pytest.raises(ValueError, match="vq.weights_file.*objects other than tensors"):
        read_state_dict(evil)
    assert not marker.exists()


def test_vgg_perceptual_weights_file_is_refused_unrun(evil, marker):
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_vgg16_features(str(evil))
    assert not marker.exists()


def test_inception_weights_file_is_refused_before_torch_fidelity_sees_it(tiny_config, evil, marker):
    tiny_config["evaluate"]["inception_weights"] = str(evil)
    with pytest.raises(ValueError, match="evaluate.inception_weights.*objects other than tensors"):
        check_inception_weights(tiny_config)
    assert not marker.exists()


def test_adm_reference_batch_with_a_pickled_object_array_is_refused_unrun(tmp_path, marker):
    images = np.empty(1, dtype=object)
    images[0] = Payload(marker)
    np.savez(tmp_path / "reference.npz", arr_0=images)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        NpzImages(tmp_path / "reference.npz", 32)
    assert not marker.exists()


def test_training_checkpoint_is_refused_on_resume_unrun(tiny_config, caches, tmp_path, marker, monkeypatch):  # noqa: F811
    interrupt_at(5, tiny_config, caches[0], tmp_path / "stage1", monkeypatch)
    state = tmp_path / "stage1.partial" / "checkpoint" / "state.pt"
    torch.save(torch.load(state, weights_only=True) | {"extra": Payload(marker)}, state)
    monkeypatch.setattr(digit.generate.train, "learning_rate", learning_rate)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_train_ar(tiny_config, caches[0], tmp_path / "stage1")
    assert not marker.exists()


# -- the evaluation: the reference-statistics cache and the Inception weights -------------------

@pytest.fixture
def evaluation(tiny_config, manifest, in_tmp, inception_weights):  # noqa: F811
    """A config with its own Inception weights file, a classifier, and samples (the val images)."""
    weights = in_tmp / "inception.pth"
    shutil.copyfile(inception_weights, weights)
    tiny_config["evaluate"].update(inception_weights=str(weights), cache_dir=str(in_tmp / "cache"))
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    val = ImageDataset(load_manifest(manifest), "val", 32)
    write_samples(in_tmp / "samples", [val[i][0] for i in range(len(val))], val.labels())
    return tiny_config, weights


def evaluate(config, manifest, root: Path, name: str) -> tuple[dict, str]:
    """metrics.json of an evaluation and whether it computed or read the reference's features (its log)."""
    with contextlib.redirect_stdout(io.StringIO()) as log:
        run_evaluate(config, root / "samples", manifest, root / "classifier", root / name)
    source = re.search(r"evaluate: reference features (\w+)", log.getvalue())[1]
    return read_json(root / name / "metrics.json"), source


def spy_on_unpickling(monkeypatch) -> list[str]:
    """The files torch.load reads without weights_only=True from here on (an in-memory buffer is no file)."""
    unsafe, load = [], torch.load

    def spying_load(f, *args, **kwargs):
        if kwargs.get("weights_only") is not True and not isinstance(f, io.BytesIO):
            unsafe.append(str(f))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    return unsafe


def test_a_planted_statistics_cache_runs_no_code(evaluation, manifest, in_tmp, marker, monkeypatch):
    """Pickles under every name torch-fidelity's cache would read (in evaluate.cache_dir and in its
    default, $TORCH_HOME/fidelity_cache) and under digit's own: none is unpickled, digit's is replaced."""
    config, weights = evaluation
    record = val_reference_record(ImageDataset(load_manifest(manifest), "val", 32).entries, 32)
    name = reference_cache_name(record, sha256_file(weights))
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch-home"))
    planted = [f"{name}.pt", f"{name}-inception-v3-compat-stat-fid-2048.pt",
               *(f"{name}-inception-v3-compat-features-{layer}.pt" for layer in ("2048", "logits_unbiased"))]
    for folder in (in_tmp / "cache", in_tmp / "torch-home" / "fidelity_cache"):
        folder.mkdir(parents=True)
        for file in planted:
            torch.save(Payload(marker), folder / file)
        (folder / f"{name}.npz").write_bytes(pickle.dumps(Payload(marker)))
    unsafe = spy_on_unpickling(monkeypatch)

    metrics, source = evaluate(config, manifest, in_tmp, "evaluate")
    assert not marker.exists() and unsafe == []
    assert source == "computed" and abs(metrics["fid"]) < 1e-2
    with np.load(in_tmp / "cache" / f"{name}.npz", allow_pickle=False) as npz:
        assert npz["features"].dtype == np.float32 and npz["features"].shape == (12, 2048)
    assert evaluate(config, manifest, in_tmp, "again")[1] == "cached"


def test_the_inception_weights_reach_torch_fidelity_as_the_tensors_that_were_checked(evaluation, manifest, in_tmp,
                                                                                   evil, marker, monkeypatch):
    """The weights file replaced by a pickle after it was checked and hashed, just before torch-fidelity
    builds its Inception: torch-fidelity never reads the file, and the record names the checked bytes."""
    config, weights = evaluation
    checked = sha256_file(weights)
    build = FeatureExtractorInceptionV3.__init__

    def swap_then_build(self, *args, **kwargs):
        shutil.copyfile(evil, weights)
        build(self, *args, **kwargs)

    monkeypatch.setattr(FeatureExtractorInceptionV3, "__init__", swap_then_build)
    metrics, _ = evaluate(config, manifest, in_tmp, "evaluate")
    assert not marker.exists()
    assert metrics["inception_weights_sha256"] == checked != sha256_file(weights)
    assert abs(metrics["fid"]) < 1e-2


# -- images that are not what their name says, or not what prepare indexed -----------------------

def small_folder(root: Path) -> Path:
    """Two classes of two 24 px images each in train and val."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("name, image_format", [("eps.jpg", "EPS"), ("gif.jpg", "GIF"), ("bmp.jpeg", "BMP"),
                                                ("jpeg.png", "JPEG")])
def test_an_image_is_decoded_only_as_its_extension_says(tmp_path, marker, monkeypatch, name, image_format):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name, image_format)
    # PIL's EPS parser, the way to Ghostscript: it must never see the file
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: marker.touch())
    expected = "PNG" if name.endswith(".png") else "JPEG"
    with pytest.raises(BadImage, match=f"{re.escape(str(tmp_path / name))}: not a {expected}") as caught:
        load_image(tmp_path / name)
    assert caught.value.reason == f"not a {expected}" and not marker.exists()


def test_prepare_names_an_image_that_is_not_what_its_extension_says(tiny_config, tmp_path):
    root = small_folder(tmp_path / "data")
    Image.new("RGB", (24, 24)).save(root / "train" / "cat" / "really.jpg", "GIF")
    with pytest.raises(ValueError, match="train/cat/really.jpg: not a JPEG.*on_bad_image: skip"):
        run_prepare(tiny_config, root, tmp_path / "prep")
    tiny_config["data"]["on_bad_image"] = "skip"
    run_prepare(tiny_config, root, tmp_path / "prep")
    report = read_json(tmp_path / "prep" / "report.json")
    assert report["skipped_files"] == [{"path": "train/cat/really.jpg", "reason": "not a JPEG",
                                        "detail": "its extension says JPEG, its bytes are not; no other decoder is tried"}]


def test_a_multi_picture_jpeg_is_a_jpeg_read_as_its_first_picture(tmp_path):
    Image.new("RGB", (16, 8), (250, 0, 0)).save(tmp_path / "camera.jpg", "MPO", save_all=True,
                                                 append_images=[Image.new("RGB", (16, 8), (0, 0, 250))])
    image = np.asarray(load_image(tmp_path / "camera.jpg")).astype(int)
    assert image.shape == (8, 16, 3) and np.abs(image - [250, 0, 0]).max() < 10


def test_an_image_changed_after_prepare_is_named_where_it_is_read(tiny_config, tmp_path, monkeypatch):
    """Every stage reads manifest images through ImageDataset or, for the K-means features,
    CropFlipViews: both hash the bytes they decode, in one read, against the manifest."""
    run_prepare(tiny_config, small_folder(tmp_path / "data"), tmp_path / "prep")
    manifest = load_manifest(tmp_path / "prep" / "manifest.json")
    val = manifest["splits"]["val"]
    Image.new("RGB", (24, 24), (1, 2, 3)).save(val[0]["path"])  # another valid image in its place
    message = f"{re.escape(val[0]['path'])} changed after prepare indexed it .*re-run prepare"
    with pytest.raises(ImageChanged, match=message):
        ImageDataset(manifest, "val", 16)[0]
    with pytest.raises(ImageChanged, match=message):
        CropFlipViews(val, range(len(val)), 16, 0)[0]

    opened, open_file = [], os.open
    monkeypatch.setattr(os, "open", lambda path, *args, **kwargs: opened.append(str(path)) or open_file(path, *args,
                                                                                                           **kwargs))
    assert ImageDataset(manifest, "val", 16)[1][0].shape == (3, 16, 16)
    assert opened == [val[1]["path"]]


# -- links and special files in an image folder ----------------------------------------------------

def plant(root: Path, elsewhere: Path, case: str) -> None:
    """One odd entry of LINKS in the folder small_folder(root) made; `elsewhere` is outside the root."""
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    if case == "file inside":
        (cat / "inside.png").symlink_to("../dog/0.png")
    elif case == "folder inside":
        (root / "extra" / "dogs").mkdir(parents=True)
        shutil.copyfile(dog / "0.png", root / "extra" / "dogs" / "z.png")
        (dog / "more").symlink_to("../../extra/dogs")
    elif case == "file outside":
        elsewhere.mkdir(exist_ok=True)
        shutil.copyfile(dog / "1.png", elsewhere / "x.png")
        (cat / "outside.png").symlink_to(elsewhere / "x.png")
    elif case == "folder outside":
        (elsewhere / "dir").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dog / "1.png", elsewhere / "dir" / "y.png")
        (dog / "away").symlink_to(elsewhere / "dir")
    elif case == "dangling":
        (cat / "dangling.png").symlink_to("missing.png")
    elif case == "looping":
        (cat / "loop.png").symlink_to("loop.png")
    elif case == "folder loop":
        (cat / "up").symlink_to("..")
    elif case == "fifo":
        os.mkfifo(root / "val" / "cat" / "pipe.png")
    elif case == "not images":
        os.mkfifo(root / "val" / "cat" / "notes.txt")
        (cat / "readme").symlink_to("nowhere")


# case -> (the path prepare reports, the reason it gives; None: followed and indexed)
LINKS = {
    "file inside": ("train/cat/inside.png", None),
    "folder inside": ("train/dog/more/z.png", None),
    "file outside": ("train/cat/outside.png", "outside data.root"),
    "folder outside": ("train/dog/away", "outside data.root"),
    "dangling": ("train/cat/dangling.png", "broken link"),
    "looping": ("train/cat/loop.png", "broken link"),
    "folder loop": ("train/cat/up", "broken link"),
    "fifo": ("val/cat/pipe.png", "not a regular file"),
}


def test_links_and_special_files_are_followed_or_reported_and_counted_alike(tiny_config, tmp_path):
    root = small_folder(tmp_path / "data")
    for case in [*LINKS, "not images"]:
        plant(root, tmp_path / "elsewhere", case)
    tiny_config["data"]["on_bad_image"] = "skip"
    run_prepare(tiny_config, root, tmp_path / "prep")
    report = read_json(tmp_path / "prep" / "report.json")
    assert {s["path"]: s["reason"] for s in report["skipped_files"]} == {
        path: reason for path, reason in LINKS.values() if reason}
    assert report["skipped_by_reason"] == {"broken link": 3, "not a regular file": 1, "outside data.root": 2}
    assert {"train/cat/readme", "val/cat/notes.txt"} <= set(report["ignored_files"])

    manifest = load_manifest(tmp_path / "prep" / "manifest.json")
    train = [os.path.relpath(e["path"], root) for e in manifest["splits"]["train"]]
    assert {"train/cat/inside.png", "train/dog/more/z.png"} <= set(train) and len(train) == 6
    assert stored_paths(tmp_path / "prep") == {split: [os.path.relpath(e["path"], root) for e in entries]
                                               for split, entries in manifest["splits"].items()}
    assert report["images"] == report["image_files_read"] == {"train": 6, "val": 4}
    assert count_images(root) == (6, 4, 2)  # what check-config counts

    with pytest.raises(BadImage, match="pipe.png: not a regular file"):  # a FIFO is refused unopened, not waited on
        load_image(root / "val" / "cat" / "pipe.png")


@pytest.mark.parametrize("case", [case for case, (_, reason) in LINKS.items() if reason])
def test_error_policy_stops_at_a_link_or_special_file_naming_it(tiny_config, tmp_path, case):
    root = small_folder(tmp_path / "data")
    plant(root, tmp_path / "elsewhere", case)
    path, reason = LINKS[case]
    with pytest.raises(ValueError, match=f"{re.escape(str(root / path))}: {reason} .*on_bad_image: skip"):
        run_prepare(tiny_config, root, tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


# -- the package source ------------------------------------------------------------------------

UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
              "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads", "numpy.lib.format.read_array"}


def unsafe_loads(source: str) -> list[str]:
    """`line: call` of each call in `source` that may unpickle: torch.load without weights_only=True,
    numpy.load with allow_pickle other than False, and the unpicklers of UNPICKLERS; aliases resolved."""
    tree = ast.parse(source)
    names = {}  # local name -> dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                          for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})

    def dotted(func) -> str:
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return ""
        return ".".join([names.get(func.id, func.id)] + parts[::-1])

    def keyword(call, name):
        value = next((k.value for k in call.keywords if k.arg == name), None)
        return value.value if isinstance(value, ast.Constant) else value

    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = dotted(call.func)
        if (name == "torch.load" and keyword(call, "weights_only") is not True
                or name == "numpy.load" and keyword(call, "allow_pickle") not in (None, False)
                or name in UNPICKLERS):
            found.append(f"{call.lineno}: {name}")
    return found


def test_the_source_check_finds_each_kind_of_unpickling():
    source = """
import pickle, numpy as np, torch as T
from torch import load
from joblib import load as jl
T.load("a")
load("a", weights_only=False)
np.load("a", allow_pickle=True)
pickle.loads(b"")
jl("a")
T.load("a", weights_only=True)
np.load("a")
np.load("a", mmap_mode="r", allow_pickle=False)
"""
    assert unsafe_loads(source) == ["5: torch.load", "6: torch.load", "7: numpy.load", "8: pickle.loads",
                                    "9: joblib.load"]


def test_the_package_never_unpickles_unsafely():
    found = {str(path.relative_to(REPO)): unsafe_loads(path.read_text())
             for path in sorted((REPO / "digit").rglob("*.py"))}
    assert {path: calls for path, calls in found.items() if calls} == {}
    assert len(found) > 10


# -- config strings that become paths and shell words ------------------------------------------

@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "-rf", ".hidden", "a b", "x;rm", "", "$(id)"])
def test_experiment_name_cannot_leave_results_or_reach_a_shell(tiny_config, name):
    tiny_config["experiment"] = name
    with pytest.raises(ConfigError, match="key 'experiment'"):
        validate(tiny_config)


@pytest.mark.parametrize("name", ["demo", "imagenet-base", "run_2.b"])
def test_plain_experiment_names_are_accepted(tiny_config, name):
    tiny_config["experiment"] = name
    validate(tiny_config)


def test_a_run_with_spaces_and_quotes_in_every_path(tiny_config, tmp_path):
    """A real Snakemake run of `prepare` whose workdir, image folder and config file all have spaces
    and quotes in their names, and the config file braces, which Snakemake would fill in inside the
    shell command (breaking its quoting: a name could run a command): every path reaches digit intact."""
    odd = tmp_path / "it's a dir"
    run_synthesize(tiny_config, odd / "my images")
    config = tiny_config | {"experiment": "odd-paths"}
    config["data"] = config["data"] | {"source": "folder", "root": str(odd / "my images")}
    config_file = odd / "conf dir" / 'the "c" {log}.yaml'
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
         "--configfile", str(config_file), "-d", str(odd / "work dir"), "results/odd-paths/prepare"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    prepared = odd / "work dir" / "results/odd-paths/prepare"
    assert read_json(prepared / "manifest.json")["root"] == str(odd / "my images")
    train = stored_paths(prepared)["train"]
    assert len(train) == 24 and (odd / "my images" / train[0]).is_file()


def stored_paths(prepared: Path) -> dict[str, list[str]]:
    """The image paths as the manifest stores them: relative to the root, so that it holds no machine path."""
    with np.load(prepared / "manifest.npz", allow_pickle=False) as columns:
        paths = {split: [os.fsdecode(p) for p in columns[f"{split}.path"]] for split in ("train", "val")}
    assert not any(os.path.isabs(p) for split in paths.values() for p in split)
    return paths
