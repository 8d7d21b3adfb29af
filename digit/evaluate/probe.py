"""Linear probe of the frozen stage-1 model: how much class information each layer holds, measured
as DiGIT's `stlm_linearprobe` measures it.

Features (the published choice): the inputs of the model's L blocks, i.e. fairseq's
inner_states[0..L-1]: the embedding output and the outputs of blocks 1..L-1 (the last block's
output is not probed), each averaged over every position of the sequence, the prefix token
included. Layer i (1..L) of the outputs is the input of block i: layer 1 is the embedding output.
The class is hidden from the model: an unconditional model (the paper's) gets its start token, a
class-conditional one its null class (stage1.class_dropout > 0); a class-conditional model without
one would be handed the answer, so it is refused.

Training streams the frozen model, as the official code does; no feature is kept, so memory
depends on probe.batch_size, not on the number of images. An epoch is one pass over the train
images in a random order, each in one of its cached views drawn at random (the views are the
augmentation). Each step runs the model without gradients on `batch_size` token sequences (in
forward passes of `micro_batch_size`), pools every probed layer and steps every layer's classifier
once: SGD, momentum 0.9, no weight decay, the layers' cross-entropies summed (each classifier gets
the gradient of its own), lr decayed by a cosine from probe.lr to 0 over epochs x ceil(N / batch_size)
steps without warm-up; weights initialised N(0, 0.01), biases 0. A checkpoint after every epoch
(`<out>.partial/`) lets the same command resume an interrupted probe to the same result.

probe.standardize: false feeds the classifiers the raw pooled features, as the official probe does
(the ImageNet configs, whose stage 1 is the official post-LN network: every probed block output is
a LayerNorm output). true standardises every feature with the mean and standard deviation of the
train features, from a streaming first pass over the train images (each once, in a view drawn at
random; shifted float64 sums), fixed during training: not a BatchNorm, so the result does not
depend on how batches are split and the classifiers stay plain linear maps of the features. The
demo uses it: its stage 1 is pre-LN, whose residual stream has another scale at every depth, which
one learning rate for every layer does not suit.

Val: every val image in the cache's identity view (its center crop); top-1 per layer. The token
cache is the one stage 1 learned: discriminative tokens of its codebook, or the VQ tokens of the
VQ-token baseline (stage1.tokens: vq).

What a probe of cached tokens cannot match (README, "The linear probe"): the official probe
tokenizes a new RandomResizedCrop(256) + flip of every train image at every step, here the views
are the cache's (center crop, flip); its val images are a 224 center crop fed at 224, here the
identity view (the 256 center crop resized to 224); it averages 257 positions [start, t1..t256],
here 256, [start, t1..t255] (the model has no position for the last token, never an input).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from digit.generate.gpt import GPT
from digit.generate.train import load_stage
from digit.runtime.checkpoint import PartialRun
from digit.runtime.config import resolve_device
from digit.runtime.io import atomic_dir, save_safetensors, sha256_file, write_json
from digit.runtime.progress import progress
from digit.runtime.schedule import cosine
from digit.runtime.token_cache import check_cache_matches, load_token_cache
from digit.stages import provenance

MOMENTUM = 0.9
INIT_STD = 0.01  # the official classifiers' weight init
LOG_HEADER = "epoch\tloss\n"


def hidden_prefix(meta: dict) -> int:
    """The prefix token that tells the model nothing about the class."""
    if not meta["class_conditional"]:
        return 0
    if meta["null_class"] is None:
        raise ValueError("the linear probe needs a stage-1 model that can run without its class: train it "
                         "unconditional (stage1.class_conditional: false) or with stage1.class_dropout > 0")
    return meta["null_class"]


def pooled_features(model: GPT, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """prefix [B, P] and target tokens [B, t] (as in GPT.forward) -> [B, n_layer, d] float32: the
    embedding output and the outputs of the first n_layer - 1 blocks (fairseq's inner_states[0..L-1]),
    each averaged over all P + t positions."""
    x = torch.cat([model.embed_prefix(prefix), model.embed_tokens(tokens)], dim=1)
    pooled = [x.float().mean(1)]
    for block in model.blocks[:-1]:
        x = block(x)
        pooled.append(x.float().mean(1))
    return torch.stack(pooled, dim=1)


class FrozenFeatures:
    """The pooled features of (image, view) pairs of one split of a token cache, by the frozen model."""

    def __init__(self, model: GPT, tokens: np.ndarray, prefix_token: int, micro_batch_size: int,
                 precision: str, device: torch.device):
        self.model, self.tokens, self.prefix_token = model, tokens, prefix_token
        self.micro, self.bf16, self.device = micro_batch_size, precision == "bf16", device

    @torch.no_grad()
    def __call__(self, index: np.ndarray, view: np.ndarray) -> torch.Tensor:
        """Images `index` in views `view` (int arrays of one length) -> [len(index), n_layer, d] on the device."""
        parts = []
        for start in range(0, len(index), self.micro):
            part = slice(start, start + self.micro)
            # the last target is never an input (GPT.forward)
            tokens = torch.from_numpy(self.tokens[index[part], view[part], :-1].astype(np.int64)).to(self.device)
            prefix = torch.full((len(tokens), 1), self.prefix_token, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                parts.append(pooled_features(self.model, prefix, tokens))
        return torch.cat(parts)


def feature_statistics(features: FrozenFeatures, views: np.ndarray,
                       batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (+1e-6) [n_layer, d] of the features of every image in views[image],
    in one streaming pass: float64 sums of x - s and (x - s)^2, s the first batch's mean."""
    n = len(views)
    shift = total = squares = None
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        x = features(index, views[index]).double()
        if shift is None:
            shift, total, squares = x.mean(0), torch.zeros_like(x[0]), torch.zeros_like(x[0])
        x = x - shift
        total += x.sum(0)
        squares += x.square().sum(0)
    mean = total / n
    var = (squares - n * mean.square()) / max(n - 1, 1)
    return (mean + shift).float(), (var.clamp(min=0).sqrt() + 1e-6).float()


class LinearProbes(nn.Module):
    """One linear classifier per layer on standardised features [B, L, d] -> logits [B, L, C]."""

    def __init__(self, layers: int, dim: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(layers, dim, num_classes, generator=generator) * INIT_STD)
        self.bias = nn.Parameter(torch.zeros(layers, num_classes))
        self.register_buffer("feature_mean", torch.zeros(layers, dim))
        self.register_buffer("feature_std", torch.ones(layers, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        return torch.einsum("bld,ldc->blc", x, self.weight) + self.bias


def run_probe(config: dict, stage1_dir: str | Path, tokens_dir: str | Path, out_dir: str | Path) -> None:
    """out_dir: metrics.json (top-1 per layer, best layer, chance), layers.tsv (for `dvc plots`), log.tsv
    (loss per epoch), probe.safetensors (classifiers and feature statistics), provenance.json."""
    pc, device, seed = config["probe"], resolve_device(config), config["seed"]
    model, meta = load_stage(stage1_dir, device)
    for p in model.parameters():
        p.requires_grad_(False)
    prefix_token = hidden_prefix(meta)
    # the cache stage 1 learned: discriminative tokens of its codebook, or (the VQ-token baseline) VQ tokens
    expected = {"kind": meta.get("tokens", "discriminative"), "vocab_size": meta["vocab_size"]}
    expected |= {key: meta[key] for key in ("codebook_sha256", "vq_sha256") if key in meta}
    caches = {}
    for split in ("train", "val"):
        tokens, labels, cache_meta = load_token_cache(tokens_dir, split)
        check_cache_matches(cache_meta, expected, source=f"token cache {tokens_dir}")
        features = FrozenFeatures(model, tokens, prefix_token, pc["micro_batch_size"],
                                  meta["training"]["precision"], device)
        caches[split] = (features, torch.from_numpy(labels.astype(np.int64)), cache_meta["views"])
    (train, train_y, _), (val, val_y, val_views) = caches["train"], caches["val"]
    n, num_views, batch = len(train_y), train.tokens.shape[1], pc["batch_size"]
    layers, classes = model.cfg.n_layer, meta["num_classes"]

    inputs = {"stage1": Path(stage1_dir) / "model.safetensors", "tokens": Path(tokens_dir) / "train.npy"}
    record = {"stage": "probe", "probe": pc, "seed": seed,
              "inputs": {name: sha256_file(path) for name, path in inputs.items()}}
    run = PartialRun(out_dir, record, LOG_HEADER)
    run.start_or_check()
    generator = torch.Generator().manual_seed(seed)
    probes = LinearProbes(layers, model.cfg.n_embd, classes, generator).to(device)
    optimizer = torch.optim.SGD(probes.parameters(), lr=pc["lr"], momentum=MOMENTUM, weight_decay=0.0)
    state = {"probes": probes, "optimizer": optimizer, "generator": generator}
    resumed = run.resume(state, device)
    epoch = resumed["step"] if resumed else 0
    if epoch == 0 and pc["standardize"]:
        stats_views = torch.randint(num_views, (n,), generator=generator).numpy()
        probes.feature_mean[:], probes.feature_std[:] = feature_statistics(train, stats_views, batch)

    steps_per_epoch = math.ceil(n / batch)
    total = pc["epochs"] * steps_per_epoch
    bar = progress(total=total, desc="probe", unit="step")
    bar.update(epoch * steps_per_epoch)
    with run.log_path.open("a") as log:
        while epoch < pc["epochs"]:
            order = torch.randperm(n, generator=generator).numpy()
            view = torch.randint(num_views, (n,), generator=generator).numpy()
            running = 0.0
            for i, start in enumerate(range(0, n, batch)):
                index = order[start:start + batch]
                x, y = train(index, view[index]), train_y[torch.from_numpy(index)].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = pc["lr"] * cosine(epoch * steps_per_epoch + i, total)
                logits = probes(x)
                # the layers' losses summed: each classifier gets the gradient of its own mean cross-entropy
                loss = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(layers)) * layers
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += loss.item() * len(index)
                bar.update()
            epoch += 1
            loss = running / n / layers
            if not math.isfinite(loss):
                raise ValueError(f"probe: loss became {loss} in epoch {epoch}; try a lower probe.lr")
            log.write(f"{epoch}\t{loss:.5f}\n")
            log.flush()
            if epoch < pc["epochs"]:
                run.save(state, epoch)
            bar.write(f"probe: epoch {epoch}/{pc['epochs']}, loss {loss:.4f}")
    bar.close()

    val_view = val_views.index("identity") if "identity" in val_views else 0
    correct = torch.zeros(layers, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(val_y), batch):
            index = np.arange(start, min(start + batch, len(val_y)))
            predictions = probes(val(index, np.full(len(index), val_view)))
            correct += (predictions.argmax(-1) == val_y[torch.from_numpy(index), None].to(device)).sum(0)
    top1 = (correct / len(val_y)).tolist()
    best = int(np.argmax(top1))
    metrics = {f"probe_top1_layer{i + 1:02d}": acc for i, acc in enumerate(top1)}
    metrics |= {"probe_top1_best": top1[best], "probe_best_layer": best + 1, "probe_chance": 1 / classes}

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        (tmp / "layers.tsv").write_text("layer\ttop1\n" + "".join(f"{i + 1}\t{a:.4f}\n" for i, a in enumerate(top1)))
        shutil.copy(run.log_path, tmp / "log.tsv")
        save_safetensors({name: t.detach().cpu().contiguous() for name, t in probes.state_dict().items()},
                         tmp / "probe.safetensors")
        write_json(tmp / "provenance.json", provenance(config, "probe", inputs))
    run.finish()
    print(f"probe: best top-1 {top1[best]:.3f} at layer {best + 1} of {layers} "
          f"(layer 1: the embedding output; chance {1 / classes:.3f})")
