"""Generation: class -> discriminative tokens (stage 1) -> VQ tokens (stage 2, AR or MaskGIT) -> pixels
(VQ decoder), in shards that run as independent jobs and are merged into one sample set.

The samples are drawn in blocks of sample.batch_size, each from a generator seeded by the run's
seed and the block's first index: the set is the same however many shards it is split into.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digit.generate.gpt import GPT, generate_masked
from digit.generate.train import load_stage
from digit.pixels.model import load_vq
from digit.runtime.config import resolve_device
from digit.runtime.images import keyed_seed, to_uint8
from digit.runtime.io import atomic_dir, read_json, sha256_file, write_json
from digit.runtime.progress import progress
from digit.runtime.shards import read_shard_records, shard_range
from digit.stages import config_subset, provenance

GRID_COLUMNS = 10


def save_png(image: torch.Tensor, path: Path) -> None:
    """uint8 [3, H, W] -> PNG file."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def check_chain(stage1: dict, stage2: dict | None, vq: dict, vq_sha256: str, image_size: int) -> None:
    """Stage 2 must have been trained on the tokens stage 1 makes and on the codes of this VQ model;
    without stage 2 (the VQ-token baseline), stage 1 on the codes of this VQ model."""
    if stage2 is None:
        pairs = {"tokens (stage 1)": (stage1.get("tokens"), "vq"), "vq_sha256 (stage 1 vs VQ model)":
                 (stage1.get("vq_sha256"), vq_sha256), "seq_len (stage 1 vs VQ grid)":
                 (stage1["seq_len"], vq["grid"][0] * vq["grid"][1]),
                 "image size (VQ model vs data.image_size)": (vq["image_size"], image_size)}
        wrong = [f"{name}: {a!r} != {b!r}" for name, (a, b) in pairs.items() if a != b]
        if wrong:
            raise ValueError("stage 1 and the VQ model do not fit together (no stage 2: stage 1 must be trained on "
                             "this VQ model's tokens, stage1.tokens: vq): " + "; ".join(wrong))
        return
    pairs = {
        "codebook_sha256 (stage 1 vs stage 2)": (stage1["codebook_sha256"], stage2["codebook_sha256"]),
        "sem vocab_size (stage 1 vs stage 2)": (stage1["vocab_size"], stage2["sem_vocab_size"]),
        "sem seq_len (stage 1 vs stage 2)": (stage1["seq_len"], stage2["sem_seq_len"]),
        "vq_sha256 (stage 2 vs VQ model)": (stage2["vq_sha256"], vq_sha256),
        "vq grid (stage 2 vs VQ model)": (stage2["vq_grid"], vq["grid"]),
        "image size (VQ model vs data.image_size)": (vq["image_size"], image_size),
    }
    wrong = [f"{name}: {a!r} != {b!r}" for name, (a, b) in pairs.items() if a != b]
    if wrong:
        raise ValueError("stage 1, stage 2 and the VQ model do not fit together: " + "; ".join(wrong))


@torch.no_grad()
def decode_stage2(stage2: GPT, sem: torch.Tensor, sc: dict, sep: int, generator: torch.Generator,
                  precision: str) -> torch.Tensor:
    """Discriminative tokens [B, T_sem] -> VQ tokens [B, T_vq]: AR with top-p (sample.stage2_top_p), or
    MaskGIT decoding, which samples plainly from the model's distribution as the official NAR decoder
    does (stage2_top_p is the AR decoder's nucleus and does not apply to it)."""
    prefix = torch.cat([sem, torch.full_like(sem[:, :1], sep)], dim=1)
    with torch.autocast(sem.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if stage2.cfg.causal:
            return stage2.generate(prefix, top_p=sc["stage2_top_p"], generator=generator)
        return generate_masked(stage2, prefix, sc["stage2_steps"], sc["stage2_choice_temperature"], generator=generator)


@torch.no_grad()
def generate_tokens(stage1: GPT, stage2: GPT | None, conditions: torch.Tensor, sc: dict, null_class: int | None,
                    sep: int, generator: torch.Generator,
                    precisions: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-1 prefix tokens [B] (class ids, or the start token 0) -> (sem tokens [B, T_sem], VQ tokens
    [B, T_vq]; the same tokens twice without stage 2); each stage runs under the precision it was trained in. Stage 1 is guided by the null
    class when sample.cfg_scale is not 1."""
    null_prefix = None if null_class is None else torch.tensor([[null_class]], device=conditions.device)
    with torch.autocast(conditions.device.type, dtype=torch.bfloat16, enabled=precisions[0] == "bf16"):
        sem = stage1.generate(conditions[:, None], temperature=sc["temperature"], top_k=sc["top_k"],
                              top_p=sc["top_p"], cfg_scale=sc["cfg_scale"], null_prefix=null_prefix, generator=generator)
    if stage2 is None:  # the VQ-token baseline: stage 1 makes the VQ tokens itself
        return sem, sem
    return sem, decode_stage2(stage2, sem, sc, sep, generator, precisions[1])


def shard_indices(num_samples: int, batch_size: int, shards: int, shard: int) -> list[torch.Tensor]:
    """The sample indices of one shard, as its blocks of sample.batch_size. Each block is drawn from a
    generator of its own (`block_generator`), so the samples do not depend on how they are sharded."""
    blocks = torch.arange(num_samples).split(batch_size)
    part = shard_range(len(blocks), shards, shard, "sample.shards", unit="blocks of sample.batch_size")
    return list(blocks[part.start:part.stop])


def block_generator(seed: int, first_index: int, device) -> torch.Generator:
    """The random stream of the block of samples that starts at `first_index`."""
    return torch.Generator(device).manual_seed(keyed_seed(seed, first_index))


def run_sample_shard(config: dict, stage1_dir: str | Path, stage2_dir: str | Path | None, vq_dir: str | Path,
                     shard: str | int, out_dir: str | Path) -> None:
    """Shard `shard` of sample.shards: its share of the sample.per_class images of every class, in
    class order, as images/<index>.png and shard.npz (indices, tokens, labels). Without stage 2 (the
    VQ-token baseline) the VQ decoder renders stage 1's tokens."""
    sc, device, shard = config["sample"], resolve_device(config), int(shard)
    stage1, meta1 = load_stage(stage1_dir, device)
    stage2, meta2 = load_stage(stage2_dir, device) if stage2_dir is not None else (None, None)
    vq_weights = Path(vq_dir) / "model.safetensors"
    vq_meta = read_json(Path(vq_dir) / "model.json")
    check_chain(meta1, meta2, vq_meta, sha256_file(vq_weights), config["data"]["image_size"])
    if sc["cfg_scale"] != 1.0 and meta1["null_class"] is None:
        raise ValueError(f"sample.cfg_scale {sc['cfg_scale']} needs a stage-1 model trained with a null class "
                         f"(stage1.class_conditional: true and stage1.class_dropout > 0); {stage1_dir} has none")
    vq = load_vq(vq_dir, device)

    labels = torch.arange(meta1["num_classes"]).repeat_interleave(sc["per_class"])
    # an unconditional stage 1 has one start token: every sample gets it, and no class
    conditions = labels if meta1["class_conditional"] else torch.zeros_like(labels)
    precisions = (meta1["training"]["precision"], meta2["training"]["precision"] if meta2 else None)
    blocks = shard_indices(len(labels), sc["batch_size"], sc["shards"], shard)
    sems, vqs = [], []
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        bar = progress(total=sum(len(b) for b in blocks), desc=f"sample-shard {shard}", unit="img")
        for indices in blocks:
            generator = block_generator(sc["seed"], int(indices[0]), device)
            sem, codes = generate_tokens(stage1, stage2, conditions[indices].to(device), sc,
                                         meta1["null_class"], meta2 and meta2["sep_token"], generator, precisions)
            images = to_uint8(vq.decode_indices(codes.view(len(codes), *vq_meta["grid"]))).cpu()
            for i, image in zip(indices.tolist(), images):
                save_png(image, tmp / "images" / f"{i:06d}.png")
            sems.append(sem.cpu())
            vqs.append(codes.cpu())
            bar.update(len(indices))
        bar.close()
        indices = torch.cat(blocks)
        np.savez(tmp / "shard.npz", indices=indices.numpy(), sem=torch.cat(sems).numpy().astype(np.uint16),
                 vq=torch.cat(vqs).numpy().astype(np.uint16),
                 labels=labels[indices].numpy() if meta1["class_conditional"] else np.full(len(indices), -1))
        write_json(tmp / "meta.json", {
            "shard": shard, "shards": sc["shards"], "num_samples": len(labels), "per_class": sc["per_class"],
            "num_classes": meta1["num_classes"], "classes": meta1["classes"],
            "class_conditional": meta1["class_conditional"], "image_size": config["data"]["image_size"],
            "provenance": provenance(config, "sample", {"stage1": Path(stage1_dir) / "model.safetensors", "vq": vq_weights}
                                     | ({"stage2": Path(stage2_dir) / "model.safetensors"} if stage2_dir else {})),
        })
    print(f"sample-shard {shard}/{sc['shards']}: {len(indices)} images in {out_dir}")


def run_sample(config: dict, shards_dir: str | Path, out_dir: str | Path) -> None:
    """Merge the shards <shards_dir>/<i> into one sample set: images/<index>.png, samples.npz, grid.png
    and meta.json, after checking that the shards come from one run and cover every index once."""
    sc, shards_dir = config["sample"], Path(shards_dir)
    metas = read_shard_records(shards_dir, sc["shards"], config_subset(config, "sample"), "sample")
    same = metas[0]
    shards = [np.load(shards_dir / str(i) / "shard.npz") for i in range(sc["shards"])]
    indices = np.concatenate([s["indices"] for s in shards])
    if sorted(indices.tolist()) != list(range(same["num_samples"])):
        raise ValueError(f"the shards in {shards_dir} do not cover the {same['num_samples']} samples once each")
    order = np.argsort(indices)
    per_class, columns = metas[0]["per_class"], min(GRID_COLUMNS, metas[0]["per_class"])
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for shard in range(sc["shards"]):
            for png in sorted((shards_dir / str(shard) / "images").glob("*.png")):
                shutil.copyfile(png, tmp / "images" / png.name)
        np.savez(tmp / "samples.npz", **{key: np.concatenate([s[key] for s in shards])[order]
                                         for key in ("sem", "vq", "labels")})
        # the grid: one row per class, its first GRID_COLUMNS samples
        shown = [i for i in range(same["num_samples"]) if i % per_class < columns]
        grid = torch.stack([torch.from_numpy(np.array(Image.open(tmp / "images" / f"{i:06d}.png"))).permute(2, 0, 1)
                            for i in shown])
        from torchvision.utils import make_grid  # on use, as in images.preprocess

        save_png(make_grid(grid, nrow=columns, padding=2), tmp / "grid.png")
        record = metas[0]["provenance"]  # the models and settings every shard was checked to share
        record["inputs"] |= {f"shard_{i}": sha256_file(shards_dir / str(i) / "shard.npz") for i in range(sc["shards"])}
        write_json(tmp / "meta.json", {**{k: v for k, v in metas[0].items() if k != "shard"}, "provenance": record})
    print(f"sample: {same['num_samples']} images from {sc['shards']} shards in {out_dir}")
