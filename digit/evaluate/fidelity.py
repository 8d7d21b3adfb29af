"""Sample quality: FID, IS, KID, precision and recall with torch-fidelity, and the evaluate stage
(those and CAS, digit/evaluate/cas.py) of the samples against the reference images.
"""
from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_fidelity
import torchvision
from torch_fidelity.metric_fid import (
    fid_featuresdict_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (
    create_feature_extractor,
    extract_featuresdict_from_input_id_cached,
    resolve_feature_layer_for_metric,
)

from digit.evaluate.cas import accuracy, load_classifier
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_image, load_manifest, preprocess
from digit.runtime.io import atomic_dir, sha256_file, sha256_json, write_json
from digit.stages import provenance


class SampleDataset(torch.utils.data.Dataset):
    """Generated samples: images/<index>.png in index order with their conditioning labels."""

    def __init__(self, samples_dir: str | Path, size: int):
        samples_dir = Path(samples_dir)
        self.paths = sorted((samples_dir / "images").glob("*.png"))
        if not self.paths:
            raise FileNotFoundError(f"no PNG samples in {samples_dir / 'images'}")
        self.labels = np.load(samples_dir / "samples.npz")["labels"].astype(np.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{samples_dir}: {len(self.paths)} images but {len(self.labels)} labels in samples.npz")
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return preprocess(load_image(self.paths[index]), self.size), int(self.labels[index])


class ImagesOnly(torch.utils.data.Dataset):
    """The uint8 images of an (image, label) dataset: the input form torch-fidelity accepts."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


def generate_inception_weights(path: str | Path, seed: int) -> None:
    """Deterministic random weights for torch-fidelity's InceptionV3, in the state-dict form it loads.

    Its module names are torchvision's, so torchvision's InceptionV3 with 1008 classes has exactly
    its parameters. Convolutions get He init so that activations keep their scale through the depth.
    With these weights FID and IS rank sample sets but are not comparable with published numbers.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


def check_inception_weights(config: dict) -> None:
    """A configured InceptionV3 weights file must exist and hold nothing but tensors: torch-fidelity
    unpickles it without weights_only, so it is opened here first, safely, before any work."""
    weights = config["evaluate"]["inception_weights"]
    if weights is None:
        return
    if not Path(weights).is_file():
        raise FileNotFoundError(f"config key 'evaluate.inception_weights': no such file {weights}")
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{weights} (evaluate.inception_weights) holds objects other than tensors, and it is not "
                         "unpickled here for safety; use torch-fidelity's released weights file") from None


def inception_weights(config: dict, scratch: Path) -> tuple[Path, bool]:
    """The InceptionV3 weights file of evaluate.inception_weights, or deterministic generated ones
    written to `scratch` (kept by their hash only, not the 96 MB file); and whether FID is calibrated."""
    check_inception_weights(config)
    if config["evaluate"]["inception_weights"] is not None:
        return Path(config["evaluate"]["inception_weights"]), True
    generated = scratch / "inception-generated.pth"
    generate_inception_weights(generated, config["seed"])
    return generated, False


FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF Inception of FID; also for P/R, as ADM
FID_FEATURES = 2048  # FID's features: Inception pool3, the "2048" layer of FEATURE_EXTRACTOR, as in ADM's mu/sigma
FID_FROM_NPZ = "npz mu/sigma"  # metrics.json fid_reference_statistics: FID against the reference batch's own statistics
FID_FROM_IMAGES = "computed from reference images"


def fidelity_metrics(samples: str | Path | torch.utils.data.Dataset, reference: torch.utils.data.Dataset | None,
                     weights: str | Path, batch_size: int, cuda: bool, seed: int, cache_root: str | Path,
                     reference_name: str | None = None, fid_statistics: dict | None = None) -> dict:
    """FID, IS, KID, precision and recall of samples (a folder of PNGs or a dataset of uint8 images)
    against a reference dataset of uint8 images; no downloads. With `reference_name`, torch-fidelity
    caches the reference's features under that name in `cache_root` and the next call naming it
    reuses them: the name must identify the images and the weights (see `reference_cache_name`).

    With `fid_statistics` ({"mu": [2048], "sigma": [2048, 2048]}, an ADM reference batch's, see
    `npz_fid_statistics`), FID is the Frechet distance between the samples' statistics and those,
    not the reference images'; KID and precision/recall still use the reference images, and are
    None when there are none (`reference` None)."""
    if not isinstance(samples, torch.utils.data.Dataset):
        samples = str(samples)
    n_samples = len(list(Path(samples).glob("*.png"))) if isinstance(samples, str) else len(samples)
    if reference is None and fid_statistics is None:
        raise ValueError("fidelity_metrics needs reference images, FID statistics or both")
    n_reference = len(reference) if reference is not None else n_samples
    kwargs = dict(
        input1=samples, input2=reference,
        cuda=cuda, batch_size=batch_size,
        fid=True, isc=True, kid=True, prc=True, isc_splits=min(10, n_samples),
        kid_subset_size=min(1000, n_samples, n_reference),
        prc_neighborhood=min(3, n_samples - 1, n_reference - 1),
        feature_extractor=FEATURE_EXTRACTOR, feature_layer_prc="2048",
        feature_extractor_weights_path=str(weights), rng_seed=seed,
        cache=reference_name is not None, input2_cache_name=reference_name,
        cache_root=str(cache_root), datasets_download=False, verbose=False,
        save_cpu_ram=not cuda)  # image-decoding workers only pay off when a GPU runs the Inception
    if fid_statistics is None:
        raw = torch_fidelity.calculate_metrics(**kwargs)
    else:
        raw = fidelity_metrics_given_fid_statistics(kwargs, fid_statistics)
    return {"fid": raw["frechet_inception_distance"],
            "inception_score": raw["inception_score_mean"], "inception_score_std": raw["inception_score_std"],
            "kid": raw.get("kernel_inception_distance_mean"), "kid_std": raw.get("kernel_inception_distance_std"),
            "precision": raw.get("precision"), "recall": raw.get("recall")}


def fidelity_metrics_given_fid_statistics(kwargs: dict, fid_statistics: dict) -> dict:
    """torch-fidelity's metrics as calculate_metrics(**kwargs) gives them (the same feature extractor,
    layers, cache and metric functions: torch_fidelity.metrics.calculate_metrics_one_feature_extractor),
    except that FID compares the samples' statistics with `fid_statistics`, which torch-fidelity
    cannot be handed; KID and precision/recall only where kwargs hold reference images (input2).
    The samples go through the Inception once, for all of them."""
    layers = {metric: resolve_feature_layer_for_metric(metric, **kwargs) for metric in ("isc", "fid", "kid", "prc")}
    extractor = create_feature_extractor(FEATURE_EXTRACTOR, sorted(set(layers.values())), **kwargs)
    samples = extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)  # input1 has no cache name
    raw = isc_featuresdict_to_metric(samples, layers["isc"], **kwargs)
    # in float64, as the ADM evaluator computes it (torch-fidelity's own mu is float32; it wants equal dtypes)
    samples_statistics = fid_featuresdict_to_statistics(samples, layers["fid"])
    stats_1, stats_2 = ({k: np.asarray(stats[k], np.float64) for k in ("mu", "sigma")}
                        for stats in (samples_statistics, fid_statistics))
    raw |= fid_statistics_to_metric(stats_1, stats_2, False)
    if kwargs["input2"] is not None:
        reference = extract_featuresdict_from_input_id_cached(2, extractor, **kwargs)
        raw |= kid_featuresdict_to_metric(samples, reference, layers["kid"], **kwargs)
        raw |= prc_featuresdict_to_metric(samples, reference, layers["prc"], **kwargs)
    return raw


def open_reference_npz(path: Path) -> np.lib.npyio.NpzFile:
    """An ADM-style reference batch, opened without unpickling anything (an object array in it is refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"config key 'evaluate.reference': no such file {path}")
    return np.load(path, allow_pickle=False)


def read_npz_array(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """One array of a reference batch; an object array (a pickle) is refused, naming the file."""
    try:
        return npz[key]
    except ValueError as error:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path} (evaluate.reference): {key}: {error}") from None


class NpzImages(torch.utils.data.Dataset):
    """The images of an ADM-style reference batch (`arr_0`: uint8 [N, H, W, 3]) as [3, H, W] tensors."""

    def __init__(self, path: str | Path, size: int):
        path = Path(path)
        with open_reference_npz(path) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{path} (evaluate.reference) has no 'arr_0' image array; keys {npz.files}")
            images = read_npz_array(npz, path, "arr_0")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{path} (evaluate.reference): arr_0 must be uint8 [N, H, W, 3], "
                             f"got {images.dtype} {list(images.shape)}")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"{path} (evaluate.reference) holds {images.shape[1]}x{images.shape[2]} images, "
                             f"the samples are {size}x{size} (data.image_size)")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1)


def npz_fid_statistics(path: str | Path) -> dict | None:
    """The FID statistics an ADM reference batch ships (`mu` [2048], `sigma` [2048, 2048]: Inception
    pool3 of the whole ImageNet train set, not of its arr_0 images), or None if it has none. MAR's
    adm_in256_stats.npz holds these alone."""
    path = Path(path)
    with open_reference_npz(path) as npz:
        present = [key for key in ("mu", "sigma") if key in npz.files]
        if not present:
            return None
        if len(present) == 1:
            missing = ({"mu", "sigma"} - set(present)).pop()
            raise ValueError(f"{path} (evaluate.reference) has '{present[0]}' but no '{missing}'; keys {npz.files}")
        stats = {key: read_npz_array(npz, path, key) for key in ("mu", "sigma")}
    for key, shape in (("mu", (FID_FEATURES,)), ("sigma", (FID_FEATURES, FID_FEATURES))):
        value = stats[key]
        if not np.issubdtype(value.dtype, np.floating) or value.shape != shape:
            raise ValueError(f"{path} (evaluate.reference): {key} must be a float array {list(shape)} (the "
                             f"statistics of Inception pool3 features), got {value.dtype} {list(value.shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"{path} (evaluate.reference): {key} holds NaN or infinite values")
    return stats


def val_reference_record(entries: list[dict], size: int) -> dict:
    """What makes a reference of val images: their files' contents and the preprocessing (runtime/images.preprocess)."""
    key = sha256_json({"images": [e["sha256"] for e in entries], "size": size,
                       "preprocess": "resize shorter side (bicubic, antialias) + center crop"})
    return {"reference": "val", "reference_images": len(entries), "reference_sha256": key}


def reference_images(config: dict, manifest: dict) -> tuple[torch.utils.data.Dataset | None, dict]:
    """The reference images of evaluate.reference and a record that identifies them: `val` (the val
    split, prepared like the data) or an ADM reference batch .npz file (None if it holds only
    mu/sigma, see `npz_fid_statistics`)."""
    size, reference = config["data"]["image_size"], config["evaluate"]["reference"]
    if reference == "val":
        dataset = ImageDataset(manifest, "val", size)
        return ImagesOnly(dataset), val_reference_record(dataset.entries, size)
    with open_reference_npz(Path(reference)) as npz:
        has_images = "arr_0" in npz.files or not {"mu", "sigma"} & set(npz.files)
    images = NpzImages(reference, size) if has_images else None
    return images, {"reference": str(reference), "reference_images": len(images) if has_images else 0,
                    "reference_sha256": sha256_file(reference)}


def reference_fid_statistics(config: dict) -> dict | None:
    """The FID statistics evaluate.reference ships (an ADM batch's mu/sigma), or None: FID is then
    computed against the reference images."""
    reference = config["evaluate"]["reference"]
    return None if reference == "val" else npz_fid_statistics(reference)


def reference_cache_name(record: dict, weights_sha256: str) -> str:
    """torch-fidelity cache entry of a reference: a new reference or new weights never meet old statistics."""
    return f"digit-{record['reference_sha256'][:24]}-{weights_sha256[:16]}"


def run_evaluate(config: dict, samples_dir: str | Path, manifest_path: str | Path,
                 classifier_dir: str | Path, out_dir: str | Path) -> None:
    """metrics.json: FID/IS/KID/precision/recall against the reference, CAS of the samples, and what
    the numbers were measured with (reference, feature extractor, its weights)."""
    check_inception_weights(config)
    device = resolve_device(config)
    size, batch_size = config["data"]["image_size"], config["evaluate"]["batch_size"]
    manifest = load_manifest(manifest_path)
    samples = SampleDataset(samples_dir, size)
    classifier, classifier_meta = load_classifier(classifier_dir, device)
    if classifier_meta["classes"] != manifest["classes"]:
        raise ValueError(f"{classifier_dir} was trained on other classes than {manifest_path} lists")
    reference, record = reference_images(config, manifest)
    fid_statistics = reference_fid_statistics(config)

    # CAS first: it decodes every sample through load_image, which names a file it cannot read
    cas = accuracy(classifier, samples, batch_size, device)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        weights, calibrated = inception_weights(config, Path(scratch))
        weights_sha256 = sha256_file(weights)
        cache_name = reference_cache_name(record, weights_sha256)
        cache_dir = Path(config["evaluate"]["cache_dir"])
        before = set(cache_dir.glob(f"{cache_name}-*"))
        metrics = fidelity_metrics(Path(samples_dir) / "images", reference, weights, batch_size,
                                   device.type == "cuda", config["seed"], cache_dir, reference_name=cache_name,
                                   fid_statistics=fid_statistics)
        # torch-fidelity recomputes all of a group of statistics when one is missing (a killed run's)
        cached = bool(before) and set(cache_dir.glob(f"{cache_name}-*")) == before
        if reference is None:
            metrics["kid_precision_recall_skipped"] = (
                f"{record['reference']} (evaluate.reference) holds mu/sigma but no arr_0 images; "
                "KID, precision and recall need reference images")
        metrics |= {
            "cas": cas,
            "chance": 1 / len(manifest["classes"]),
            "classifier_val_accuracy": classifier_meta["val_accuracy"],
            "num_samples": len(samples), **record,
            "reference_statistics": "unused" if reference is None else "cached" if cached else "computed",
            "fid_reference_statistics": FID_FROM_IMAGES if fid_statistics is None else FID_FROM_NPZ,
            "feature_extractor": f"torch-fidelity {FEATURE_EXTRACTOR}",
            "fid_calibrated": calibrated,
            "inception_weights": str(weights) if calibrated else "generated",
            "inception_weights_sha256": weights_sha256,
        }
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "provenance.json", provenance(
            config, "evaluate",
            {"manifest": manifest_path, "samples": Path(samples_dir) / "samples.npz",
             "classifier": Path(classifier_dir) / "model.safetensors"}))
    pr = ("no precision/recall (no reference images)" if metrics["precision"] is None
          else f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}")
    print(f"evaluate: FID {metrics['fid']:.3f} ({metrics['fid_reference_statistics']}), "
          f"IS {metrics['inception_score']:.3f}, {pr}, CAS {metrics['cas']:.3f} (chance {metrics['chance']:.3f})")
