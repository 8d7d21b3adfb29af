"""Files and config strings from outside: no pickle runs code, no path escapes or breaks a command.

Every loader of a file a user may have downloaded is fed one whose pickle would create a marker
file when unpickled; each must refuse it without creating the marker. The package source is checked
(on its syntax tree) for any way of unpickling that could run such code.
"""
import ast
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train import caches, interrupt_at  # noqa: F401 (caches is a fixture)

import digit.generate.train
from digit.data.synthetic import run_synthesize
from digit.evaluate.fidelity import NpzImages, check_inception_weights
from digit.generate.train import learning_rate, run_train_ar
from digit.pixels.losses import load_vgg16_features
from digit.pixels.weights import read_state_dict
from digit.runtime.config import ConfigError, validate
from digit.tokenizer.encoders import create_model

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
    and quotes in their names: every path reaches the digit command intact."""
    odd = tmp_path / "it's a dir"
    run_synthesize(tiny_config, odd / "my images")
    config = tiny_config | {"experiment": "odd-paths"}
    config["data"] = config["data"] | {"source": "folder", "root": str(odd / "my images")}
    config_file = odd / "conf dir" / 'the "c".yaml'
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1",
         "--configfile", str(config_file), "-d", str(odd / "work dir"), "results/odd-paths/prepare"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load((odd / "work dir" / "results/odd-paths/prepare/manifest.json").read_text())
    assert manifest["root"] == str(odd / "my images") and len(manifest["splits"]["train"]) == 24
    assert Path(manifest["splits"]["train"][0]["path"]).is_file()
