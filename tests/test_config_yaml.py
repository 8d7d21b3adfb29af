"""The config file as YAML: one strict document, every problem one line naming the file and line, read by
`digit check-config` and by the workflow alike."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from digit.cli import main
from digit.runtime.config import ConfigError, validate

REPO = Path(__file__).resolve().parents[1]
DEMO = (REPO / "config" / "config.yaml").read_text()
SEED_LINE = DEMO.splitlines().index("seed: 0") + 1
END = DEMO.count("\n") + 1  # the first line after the demo's text


def laughs(levels: int = 9) -> str:
    """A billion laughs: each list holds nine aliases of the one before, 9**levels strings in all."""
    rows = ['lol0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(rows) + "\n"


# name -> (file contents, what the one-line message says after "<file>, ")
BAD_FILES = {
    "syntax error": (DEMO + "foo: [1, 2\n", f"line {END + 1}, column 1: while parsing a flow sequence"),
    "second document": (DEMO + "---\nseed: 1\n", f"line {END}, column 1: expected a single document"),
    "non-UTF-8 byte": (DEMO.encode() + b"# caf\xe9\n", f"line {END}: byte 0xe9 is not UTF-8"),
    "NUL character": (DEMO + "# \x00\n", f"line {END}: character U+0000 is not allowed"),
    "empty file": ("", "the file is empty"),
    "python tag": (DEMO.replace("seed: 0", "seed: !!python/tuple [1, 2]"),
                   f"line {SEED_LINE}, column 7: could not determine a constructor for the tag "
                   "'tag:yaml.org,2002:python/tuple'"),
    "duplicate key": (DEMO + "seed: 5\n", f"line {END}, column 1: duplicate key 'seed' (first on line {SEED_LINE})"),
    "nested duplicate key": (DEMO.replace("  k: 256", "  k: 16\n  k: 256", 1),
                             f"duplicate key 'k' (first on line {DEMO.splitlines().index('  k: 256') + 1})"),
    "billion laughs": (DEMO + laughs(), f"line {END + 1}, column 12: alias *a0: aliases are not allowed"),
    "merge key": (DEMO + "x: &x {a: 1}\ny:\n  <<: *x\n", f"line {END + 2}, column 7: alias *x"),
    "deep nesting": (DEMO + "x: " + "[" * 100_000 + "]" * 100_000 + "\n", "values nested too deeply"),
}


def write(path: Path, text) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_the_demo_has_the_lines_these_tests_edit():
    assert "  k: 256" in DEMO.splitlines() and SEED_LINE < END


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_yaml_file_is_one_line_naming_file_and_line(tmp_path, capsys, name):
    text, said = BAD_FILES[name]
    path = write(tmp_path / "c.yaml", text)
    start = time.perf_counter()
    assert main(["check-config", "--config", str(path)]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.startswith(f"digit: {path}") and said in err, err
    assert err.count("\n") == 1 and len(err) < 400, err


def test_a_yte_template_is_refused_as_code(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", "__use_yte__: true\n" + DEMO)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "key '__use_yte__'" in err and "a config file is code to Snakemake" in err


def test_non_finite_numbers_in_the_file_are_named_by_key(tmp_path, capsys):
    text = DEMO.replace("seed: 0", "seed: 0.0").replace("  k: 256", "  k: .inf", 1)
    text = text.replace("  sample_fraction:", "  sample_fraction: .nan #", 1)
    assert main(["check-config", "--config", str(write(tmp_path / "c.yaml", text))]) == 2
    err = capsys.readouterr().err
    assert "key 'seed': 0.0 is a float, where an integer is expected (write 0)" in err
    assert "key 'kmeans.k': inf is not a finite number" in err
    assert "key 'kmeans.sample_fraction': nan is not a finite number" in err


def test_a_huge_value_is_not_repeated_in_the_message(tmp_path, capsys):
    config = yaml.safe_load(DEMO)
    config["experiment"] = "x" * 1_000_000 + "!"
    config["stability"]["snr_db"] = ["loud"] * 1000
    assert main(["check-config", "--config", str(write(tmp_path / "c.yaml", yaml.safe_dump(config)))]) == 2
    err = capsys.readouterr().err
    assert re.search(r"key 'experiment': 'x+\.\.\. \(10000\d\d characters\)", err)
    assert re.search(r"and 9\d\d more", err) and len(err) < 10_000


def snakemake_plan(configfile: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
                             "--configfile", str(configfile), "-d", str(configfile.parent)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["duplicate key", "billion laughs", "python tag"])
def test_snakemake_stops_with_digits_message(tmp_path, name):
    """Snakemake reads a --configfile itself first and takes these; digit's reader then stops the
    workflow before any value is used (its schema check would print the whole expansion)."""
    text, said = BAD_FILES[name]
    code, output = snakemake_plan(write(tmp_path / "c.yaml", text))
    assert code != 0 and said in output, output[-3000:]
    assert "results" not in [p.name for p in tmp_path.iterdir()]


def test_snakemake_names_a_yte_config_as_code(tmp_path):
    """YTE runs the template's code as Snakemake reads the file, before any check of the workflow's:
    all it can do is say so."""
    marker = tmp_path / "template-ran"
    text = "__use_yte__: true\n" + DEMO.replace("seed: 0", f"seed: ?0 if open({str(marker)!r}, 'w') else 1")
    code, output = snakemake_plan(write(tmp_path / "c.yaml", text))
    assert marker.exists()  # Snakemake evaluated it
    assert code != 0 and "a config file is code to Snakemake" in output, output[-3000:]
    assert "--config overrides" not in output


# -- values that YAML reads as another type, or that pass every bound ----------------------------

# key -> (value, what the message says of it): each passed the schema once and failed hours later, or not at all
BAD_VALUES = {
    "seed": (True, "True is not of type 'integer'"),  # a bool is an int to Python
    "encoder.final_norm": (1, "1 is not of type 'boolean'"),
    "tokenize.shards": (2.0, "2.0 is a float, where an integer is expected (write 2)"),
    "kmeans.k": (256.0, "256.0 is a float, where an integer is expected (write 256)"),
    "stage1.lr": (float("nan"), "nan is not a finite number"),
    "vq.ema_decay": (float("nan"), "nan is not a finite number"),  # NaN > 0 is false: EMA silently off
    "kmeans.sample_fraction": (float("nan"), "nan is not a finite number"),
    "sample.temperature": (float("inf"), "inf is not a finite number"),
    "experiment": ("demo\n", "'demo\\n' does not match"),  # $ matches before a final newline
    "encoder.overrides.img_size": ("64", "'64' is not valid under any of the given schemas"),
    "encoder.overrides.patch_size": (0, "0 is less than the minimum of 1"),
}


@pytest.mark.parametrize("key", BAD_VALUES)
def test_a_value_of_the_wrong_kind_is_named_by_its_key(tiny_config, key):
    value, said = BAD_VALUES[key]
    *parents, last = key.split(".")
    section = tiny_config
    for parent in parents:
        section = section[parent]
    section[last] = value
    with pytest.raises(ConfigError) as error:
        validate(tiny_config)
    assert f"key '{key}': {said}" in str(error.value)


def test_encoder_overrides_take_only_the_vits_keys(tiny_config):
    tiny_config["encoder"]["overrides"]["dropout"] = 0.1
    with pytest.raises(ConfigError, match=r"key 'encoder.overrides': Additional properties .*'dropout' was unexpected"):
        validate(tiny_config)


def test_braces_in_the_image_folder_are_refused_by_key(tmp_path):
    """Snakemake reads {...} in an input path as a wildcard: data.root with braces is named, not run."""
    config = yaml.safe_load(DEMO)
    config["data"] |= {"source": "folder", "root": str(tmp_path / "images{x}")}
    code, output = snakemake_plan(write(tmp_path / "c.yaml", yaml.safe_dump(config)))
    assert code != 0 and "key 'data.root'" in output and "wildcard" in output, output[-3000:]
