"""The pipeline's stages, defined once.

Per stage: the Snakemake rules that make it (a sharded stage: its shard rule and its merge), the
config keys its outputs depend on, the packages of digit/ that are its code, and its `digit`
subcommands (library function, help, path flags; `launchable`: the training flags of
digit/runtime/launch.py). From this table come the Snakemake params (the re-run triggers), the
CLI, the launcher's stages, the config subset and code hashes every output records (provenance),
and, with the paths of the Snakemake rules, dvc.yaml (workflow/scripts/dvc_yaml.py writes it).

Editing a module re-runs exactly the stages whose code package holds it: Snakemake sees the hash
of the package among the rule's params, DVC sees the package directory among the stage's deps.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent


@dataclass(frozen=True)
class Command:
    target: str  # "module:function", called as function(config, *paths)
    help: str
    flags: tuple[tuple[str, str], ...]  # (flag, help) of each path argument, in the function's order
    launchable: bool = False
    optional: tuple[str, ...] = ()  # flags that may be left out (None): stage 2's, in the VQ-token baseline


@dataclass(frozen=True)
class Stage:
    params: tuple[str, ...]
    code: tuple[str, ...]  # package directories of digit/
    commands: dict[str, Command] = field(default_factory=dict)
    rules: tuple[str, ...] = ()  # default: the stage's own name


MANIFEST = ("--manifest", "manifest.json from prepare")
TOKENS = ("--tokens", "discriminative token cache")
STAGE1, STAGE2 = ("--stage1", "directory from train-ar"), ("--stage2", "directory from train-decoder")
VQ = ("--vq", "directory from train-vq")
CODEBOOK = ("--codebook", "directory from kmeans")
OUT = ("--out", "output directory")
CHECKPOINT = ("--checkpoint", "DiGIT's released fairseq checkpoint, or its safetensors conversion")


def shards_flag(key: str) -> tuple[str, str]:
    return ("--shards", f"directory holding the shards 0 .. {key} - 1")


def shard_flag(key: str) -> tuple[str, str]:
    return ("--shard", f"shard index, 0 .. {key} - 1")


STAGES: dict[str, Stage] = {
    "synthesize": Stage(
        params=("seed", "data.synthetic"), code=("data", "runtime"),
        commands={"synthesize": Command("digit.data.synthetic:run_synthesize", "generate the embedded demo image folder",
                                        (("--out", "output image folder"),))}),
    "prepare": Stage(
        params=("data",), code=("data", "runtime"),
        commands={"prepare": Command("digit.data.prepare:run_prepare",
                                     "validate and index an image folder into a manifest",
                                     (("--data", "image folder with train/<class>/ and val/<class>/"),
                                      ("--out", "output directory (manifest.json, report.json)")))}),
    "features": Stage(
        params=("device", "seed", "data.image_size", "encoder", "kmeans.sample_fraction", "kmeans.seed",
                "kmeans.feature_shards"),
        code=("tokenizer", "runtime"), rules=("features_shard", "features"),
        commands={"features-shard": Command("digit.tokenizer.features:run_features_shard",
                                            "encoder patch features of one shard of the K-means sample of train",
                                            (MANIFEST, shard_flag("kmeans.feature_shards"), OUT))}),
    "kmeans": Stage(
        params=("device", "kmeans"), code=("tokenizer", "runtime"),
        commands={"kmeans": Command("digit.tokenizer.kmeans:run_kmeans", "faiss K-means of the features to a codebook",
                                    (("--features", "directory holding the features shards 0 .. "
                                                    "kmeans.feature_shards - 1"), OUT))}),
    "import_centroids": Stage(
        params=("seed", "data.image_size", "encoder", "kmeans"), code=("tokenizer", "runtime"),
        commands={"import-centroids": Command("digit.tokenizer.kmeans:run_import_centroids",
                                              "released K-means centroids (kmeans.weights_file) to a codebook",
                                              (("--centroids", "[K, D] .npy of centroids (kmeans.weights_file)"),
                                               OUT))}),
    "tokenize": Stage(
        params=("device", "seed", "data.image_size", "encoder", "tokenize"),
        code=("tokenizer", "runtime"), rules=("tokenize_shard", "tokenize"),
        commands={"tokenize-shard": Command("digit.tokenizer.tokens:run_tokenize_shard",
                                            "one shard of the images to their discriminative tokens",
                                            (MANIFEST, CODEBOOK, shard_flag("tokenize.shards"), OUT)),
                  "tokenize": Command("digit.tokenizer.tokens:run_tokenize",
                                      "merge the tokenize shards into the token cache",
                                      (shards_flag("tokenize.shards"), ("--out", "output token cache directory")))}),
    "train_vq": Stage(
        params=("device", "seed", "data.image_size", "vq"), code=("pixels", "runtime"),
        rules=("train_vq", "import_vq"),  # import_vq: vq.weights: file, converted, not trained
        commands={"train-vq": Command("digit.pixels.train:run_train_vq",
                                      "train the VQ autoencoder (the pixel tokenizer)", (MANIFEST, OUT),
                                      launchable=True)}),
    "tokenize_vq": Stage(
        params=("device", "data.image_size", "tokenize", "vq.precision"), code=("pixels", "runtime"),
        rules=("tokenize_vq_shard", "tokenize_vq"),
        commands={"tokenize-vq-shard": Command("digit.pixels.tokenize:run_tokenize_vq_shard",
                                               "one shard of the images to their VQ token grids",
                                               (MANIFEST, VQ, shard_flag("tokenize.shards"), OUT)),
                  "tokenize-vq": Command("digit.pixels.tokenize:run_tokenize_vq",
                                         "merge the tokenize-vq shards into the VQ token cache",
                                         (shards_flag("tokenize.shards"), ("--out", "output token cache directory")))}),
    "train_ar": Stage(
        params=("device", "seed", "kmeans.k", "vq.codebook_size", "stage1"), code=("generate", "runtime"),
        commands={"train-ar": Command("digit.generate.train:run_train_ar",
                                      "train the stage-1 GPT on discriminative tokens", (TOKENS, OUT),
                                      launchable=True)}),
    "train_decoder": Stage(
        params=("device", "seed", "kmeans.k", "vq.codebook_size", "stage2"), code=("generate", "runtime"),
        commands={"train-decoder": Command("digit.generate.train:run_train_decoder",
                                           "train the stage-2 decoder (sem -> VQ tokens)",
                                           (TOKENS, ("--vq-tokens", "VQ token cache"), OUT), launchable=True)}),
    "import_stage1": Stage(
        params=("kmeans.k", "stage1"), code=("generate", "runtime"),
        commands={"import-stage1": Command("digit.generate.released:run_import_stage1",
                                           "DiGIT's released stage-1 checkpoint (stage1.weights_file) to a stage-1 model",
                                           (CHECKPOINT, MANIFEST, CODEBOOK, OUT))}),
    "import_stage2": Stage(
        params=("kmeans.k", "vq.codebook_size", "stage2"), code=("generate", "runtime"),
        commands={"import-stage2": Command("digit.generate.released:run_import_stage2",
                                           "DiGIT's released stage-2 checkpoint (stage2.weights_file) to a stage-2 model",
                                           (CHECKPOINT, CODEBOOK, VQ, OUT))}),
    "probe": Stage(
        params=("device", "seed", "probe"), code=("evaluate", "generate", "runtime"),
        commands={"probe": Command("digit.evaluate.probe:run_probe",
                                   "linear probe of every layer of the frozen stage-1 model", (STAGE1, TOKENS, OUT))}),
    "sample": Stage(
        params=("device", "data.image_size", "sample"), code=("generate", "pixels", "runtime"),
        rules=("sample_shard", "sample"),
        commands={"sample-shard": Command("digit.generate.sample:run_sample_shard",
                                          "stage 1 -> stage 2 -> VQ decoder: one shard of the samples",
                                          (STAGE1, STAGE2, VQ, shard_flag("sample.shards"), OUT),
                                          optional=("--stage2",)),
                  "sample": Command("digit.generate.sample:run_sample",
                                    "merge the sample shards: PNG samples, their tokens and a grid",
                                    (shards_flag("sample.shards"), OUT))}),
    "train_classifier": Stage(
        params=("device", "seed", "data.image_size", "classifier"), code=("evaluate", "runtime"),
        rules=("train_classifier", "import_classifier"),  # import_classifier: classifier.weights: file
        commands={"train-classifier": Command("digit.evaluate.cas:run_train_classifier",
                                              "GAN-test's classifier: trained on the real train images, or "
                                              "pretrained (classifier.weights_file)", (MANIFEST, OUT))}),
    "evaluate": Stage(
        params=("device", "evaluate"), code=("evaluate", "runtime"),
        commands={"evaluate": Command("digit.evaluate.fidelity:run_evaluate",
                                      "FID, IS, KID (torch-fidelity) and GAN-test of the samples",
                                      (("--samples", "directory from sample"), MANIFEST,
                                       ("--classifier", "directory from train-classifier"), OUT),
                                      optional=("--classifier",))}),
    "cas": Stage(
        params=("device", "seed", "data.image_size", "classifier.steps", "classifier.batch_size", "classifier.lr"),
        code=("evaluate", "runtime"),
        commands={"cas": Command("digit.evaluate.cas:run_cas",
                                 "CAS: a classifier trained on the class-conditional samples, scored on the real "
                                 "val images", (("--samples", "directory from sample"), MANIFEST, OUT))}),
    "upper_bound": Stage(
        params=("device", "seed", "data.image_size", "sample", "evaluate", "upper_bound"),
        code=("evaluate", "generate", "pixels", "runtime"),
        commands={"upper-bound": Command("digit.evaluate.upper_bound:run_upper_bound",
                                         "ground-truth val tokens -> stage 2 -> VQ decoder, and the VQ alone: "
                                         "FID, IS, PSNR", (MANIFEST, TOKENS, STAGE2, VQ, OUT),
                                         optional=("--tokens", "--stage2"))}),
    "stability": Stage(
        params=("device", "seed", "data.image_size", "encoder", "tokenize.batch_size", "vq.precision", "stability"),
        code=("evaluate", "generate", "pixels", "tokenizer", "runtime"),
        commands={"stability": Command("digit.evaluate.stability:run_stability",
                                       "fraction of discriminative and VQ tokens that Gaussian noise changes, per SNR",
                                       (MANIFEST, CODEBOOK, VQ, OUT))}),
    "report": Stage(
        params=("experiment",), code=("evaluate", "runtime"),
        commands={"report": Command("digit.evaluate.report:run_report", "metrics.json, loss curves and the sample grid",
                                    (("--evaluate", "directory from evaluate"), ("--cas", "directory from cas"),
                                     ("--probe", "directory from probe"),
                                     ("--upper-bound", "directory from upper-bound"), STAGE1, STAGE2, VQ,
                                     ("--samples", "directory from sample"),
                                     ("--out", "experiment results directory")),
                                    optional=("--cas", "--probe", "--stage2"))}),
}

COMMANDS: dict[str, Command] = {name: command for stage in STAGES.values() for name, command in stage.commands.items()}
STAGE_OF_COMMAND = {name: stage for stage, s in STAGES.items() for name in s.commands}


def rules(stage: str) -> tuple[str, ...]:
    return STAGES[stage].rules or (stage,)


STAGE_OF_RULE = {rule: stage for stage in STAGES for rule in rules(stage)}


def config_subset(config: dict, stage: str) -> dict:
    """The values of the stage's config keys, by dotted key."""
    values = {}
    for key in STAGES[stage].params:
        node = config
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return values


# Not the code of any stage's output: Python's bytecode caches (.dvcignore leaves them out too).
IGNORED = ("__pycache__",)


def package_sha256(package: str, root: Path = PACKAGE) -> str:
    """sha256 of a package directory's files: their paths inside it and their contents."""
    h = hashlib.sha256()
    directory = root / package
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not set(IGNORED) & set(p.parts)):
        h.update(f"{path.relative_to(directory).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def code_sha256(stage: str, root: Path = PACKAGE) -> dict[str, str]:
    """The stage's code: each of its packages' hash, by path (digit/<package>)."""
    return {f"digit/{package}": package_sha256(package, root) for package in STAGES[stage].code}


def package_versions() -> dict[str, str]:
    packages = {}
    faiss_builds = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11")  # whichever one is installed
    for name in ("torch", "torchvision", "timm", *faiss_builds, "numpy", "pillow", "torch-fidelity", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return packages


def provenance(config: dict, stage: str, inputs: dict[str, str | Path] | None = None) -> dict:
    """What made an output of `stage`: its config keys, the hashes of its inputs and of its code, and
    the versions of Python and of the packages. Nothing else (no commit, time or host): the same
    record, and with it the same bytes, whenever the same inputs meet the same code."""
    from digit.runtime.io import sha256_file

    return {
        "stage": stage,
        "config": config_subset(config, stage),
        "inputs": {k: sha256_file(v) for k, v in (inputs or {}).items()},
        "code": code_sha256(stage),
        "python": sys.version.split()[0],
        "packages": package_versions(),
    }
