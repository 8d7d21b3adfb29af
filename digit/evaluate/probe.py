"""Linear probe of the frozen stage-1 model: how much class information each layer holds.

Features: every block's output, averaged over the token positions (the model's `layer_means`),
with the class hidden from the model: an unconditional model gets its start token, a
class-conditional one its null class (stage1.class_dropout > 0); a class-conditional model without
one would be handed the answer, so it is refused. Train images in every cached view (the flip is
the augmentation), val images in the first view. One linear classifier per layer, all trained
jointly: SGD with momentum 0.9 and a cosine schedule (the paper), on features standardised with
the train statistics (a BatchNorm without affine parameters, as in MAE's probe).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from digit.generate.train import load_stage
from digit.runtime.config import resolve_device
from digit.runtime.io import atomic_dir, write_json
from digit.runtime.schedule import cosine
from digit.runtime.token_cache import check_cache_matches, load_token_cache
from digit.stages import provenance


def hidden_prefix(meta: dict) -> int:
    """The prefix token that tells the model nothing about the class."""
    if not meta["class_conditional"]:
        return 0
    if meta["null_class"] is None:
        raise ValueError("the linear probe needs a stage-1 model that can run without its class: train it "
                         "unconditional (stage1.class_conditional: false) or with stage1.class_dropout > 0")
    return meta["null_class"]


@torch.no_grad()
def extract(model, tokens: np.ndarray, prefix_token: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Token grids [N, T] -> layer features [N, n_layer, d] (float32, on the CPU)."""
    features = []
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start:start + batch_size, :-1].astype(np.int64)).to(device)
        prefix = torch.full((len(batch), 1), prefix_token, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            features.append(model.layer_means(prefix, batch).float().cpu())
    return torch.cat(features)


def train_probes(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, pc: dict, seed: int,
                 device) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One linear classifier per layer on features [N, L, d]: (weights [L, d, C], biases [L, C], loss per epoch)."""
    n, layers, dim = train_x.shape
    weight = torch.zeros(layers, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(layers, num_classes, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([weight, bias], lr=pc["lr"], momentum=0.9)
    steps_per_epoch = math.ceil(n / pc["batch_size"])
    total = pc["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(step, total))
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for _ in range(pc["epochs"]):
        order, running = torch.randperm(n, generator=generator), 0.0
        for batch in order.split(pc["batch_size"]):
            x, y = train_x[batch].to(device), train_y[batch].to(device)
            logits = torch.einsum("bld,ldc->blc", x, weight) + bias
            # the layers' losses are summed: each classifier gets its own full gradient
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(layers), reduction="mean") * layers
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(batch)
        epoch_losses.append(running / n / layers)
    return weight.detach(), bias.detach(), epoch_losses


def run_probe(config: dict, stage1_dir: str | Path, tokens_dir: str | Path, out_dir: str | Path) -> None:
    """out_dir: metrics.json (top-1 per layer, best layer), layers.tsv (for `dvc plots`), log.tsv, probe.safetensors."""
    pc, device = config["probe"], resolve_device(config)
    model, meta = load_stage(stage1_dir, device)
    prefix_token = hidden_prefix(meta)
    precision = meta["training"]["precision"]
    splits = {}
    for split in ("train", "val"):
        tokens, labels, cache_meta = load_token_cache(tokens_dir, split)
        check_cache_matches(cache_meta, {"kind": "discriminative", "codebook_sha256": meta["codebook_sha256"],
                                         "vocab_size": meta["vocab_size"]}, source=f"token cache {tokens_dir}")
        if split == "train":  # every view of every train image
            labels = np.repeat(labels, tokens.shape[1])
            tokens = tokens.reshape(-1, tokens.shape[2])
        else:
            tokens = tokens[:, 0]
        splits[split] = (extract(model, tokens, prefix_token, pc["batch_size"], precision, device),
                         torch.from_numpy(labels.astype(np.int64)))
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std

    weight, bias, epoch_losses = train_probes(train_x, train_y, meta["num_classes"], pc, config["seed"], device)
    with torch.no_grad():
        predictions = (torch.einsum("bld,ldc->blc", val_x.to(device), weight) + bias).argmax(-1).cpu()
    top1 = (predictions == val_y[:, None]).float().mean(0).tolist()
    best = int(np.argmax(top1))
    metrics = {f"probe_top1_layer{i + 1:02d}": acc for i, acc in enumerate(top1)}
    metrics |= {"probe_top1_best": top1[best], "probe_best_layer": best + 1,
                "probe_chance": 1 / meta["num_classes"]}

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        (tmp / "layers.tsv").write_text("layer\ttop1\n" + "".join(f"{i + 1}\t{a:.4f}\n" for i, a in enumerate(top1)))
        (tmp / "log.tsv").write_text("epoch\tloss\n" + "".join(f"{e + 1}\t{l:.5f}\n" for e, l in enumerate(epoch_losses)))
        save_file({"weight": weight.cpu().contiguous(), "bias": bias.cpu().contiguous(),
                   "feature_mean": mean.contiguous(), "feature_std": std.contiguous()}, tmp / "probe.safetensors")
        write_json(tmp / "provenance.json", provenance(
            config, "probe",
            {"stage1": Path(stage1_dir) / "model.safetensors", "tokens": Path(tokens_dir) / "train.npy"}))
    print(f"probe: best top-1 {top1[best]:.3f} at layer {best + 1} of {len(top1)} "
          f"(chance {1 / meta['num_classes']:.3f})")
