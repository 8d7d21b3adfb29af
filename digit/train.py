"""Training of the two generative stages: one loop, two ways of making a batch.

Stage 1 (run_train_ar): class token -> discriminative tokens. Stage 2 (run_train_decoder):
[sem tokens, sep] -> VQ tokens of the same image view. Each step draws images and one of their
cached views at random. Checkpoints go to `<out_dir>.partial/`; running the same command again
resumes there, and `out_dir` appears only when training has finished.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from digit.config import resolve_device
from digit.gpt import GPT, PRESETS, GPTConfig
from digit.io import atomic_dir, provenance, read_json, write_json
from digit.tokens import check_cache_matches, load_token_cache

LOG_HEADER = "step\tloss\tlr\ttokens_per_s\tgrad_norm\n"


def learning_rate(step: int, tc: dict) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps` or inverse-sqrt decay (fairseq)."""
    warmup = tc["warmup_steps"]
    if step <= warmup:
        return tc["lr"] * step / warmup
    if tc["schedule"] == "cosine":
        progress = (step - warmup) / max(1, tc["steps"] - warmup)
        return tc["lr"] * 0.5 * (1 + math.cos(math.pi * progress))
    return tc["lr"] * math.sqrt(max(1, warmup) / step)


def make_optimizer(model: nn.Module, tc: dict) -> torch.optim.AdamW:
    """AdamW with weight decay on the linear weights only (not on norms and embeddings)."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc["lr"], betas=(0.9, 0.98))


def load_checked_cache(tokens_dir: str | Path, kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The train split of a token cache, after checking its kind and that its tokens fit its vocabulary."""
    tokens, labels, meta = load_token_cache(tokens_dir, "train")
    check_cache_matches(meta, {"kind": kind}, source=f"token cache {tokens_dir}")
    top = int(tokens.max())
    if top >= meta["vocab_size"]:
        raise ValueError(f"token cache {tokens_dir} holds token {top}, outside its vocab_size "
                         f"{meta['vocab_size']} (meta.json)")
    return tokens, labels, meta


def run_train_ar(config: dict, tokens_dir: str | Path, out_dir: str | Path) -> None:
    tc = config["stage1"]
    tokens, labels, meta = load_checked_cache(tokens_dir, "discriminative")
    if labels.min() < 0 or labels.max() >= meta["num_classes"]:
        raise ValueError(f"{tokens_dir}/train_labels.npy has labels outside 0..{meta['num_classes'] - 1}")
    conditional = tc["class_conditional"]
    gpt_cfg = GPTConfig(vocab_size=meta["vocab_size"], seq_len=tokens.shape[2],
                        prefix_vocab_size=meta["num_classes"] if conditional else 1, prefix_len=1,
                        **PRESETS[tc["preset"]])
    record = {"stage": "stage1", "model": asdict(gpt_cfg), "class_conditional": conditional,
              "num_classes": meta["num_classes"], "classes": meta["classes"], "vocab_size": meta["vocab_size"],
              "seq_len": tokens.shape[2], "grid": meta["grid"], "codebook_sha256": meta["codebook_sha256"]}
    labels = torch.from_numpy(labels)

    def make_batch(index, view):
        targets = torch.from_numpy(tokens[index, view].astype(np.int64))
        prefix = labels[index][:, None] if conditional else torch.zeros(len(index), 1, dtype=torch.long)
        return prefix, targets

    inputs = {"tokens": Path(tokens_dir) / "train.npy", "tokens_meta": Path(tokens_dir) / "meta.json"}
    _train(config, "stage1", gpt_cfg, make_batch, tokens.shape[:2], record, inputs, out_dir)


def run_train_decoder(config: dict, tokens_dir: str | Path, vq_tokens_dir: str | Path, out_dir: str | Path) -> None:
    sem, sem_labels, sem_meta = load_checked_cache(tokens_dir, "discriminative")
    vq, vq_labels, vq_meta = load_checked_cache(vq_tokens_dir, "vq")
    # the pairs are (sem, vq) tokens of the same image in the same view
    same = {"number of images": len(sem) == len(vq), "views": sem_meta["views"] == vq_meta["views"],
            "labels": np.array_equal(sem_labels, vq_labels)}
    if not all(same.values()):
        raise ValueError(f"token caches {tokens_dir} and {vq_tokens_dir} do not hold the same images: their "
                         + ", ".join(name for name, ok in same.items() if not ok) + " differ")
    sep = sem_meta["vocab_size"]
    gpt_cfg = GPTConfig(vocab_size=vq_meta["vocab_size"], seq_len=vq.shape[2], prefix_vocab_size=sep + 1,
                        prefix_len=sem.shape[2] + 1, **PRESETS[config["stage2"]["preset"]])
    record = {"stage": "stage2", "model": asdict(gpt_cfg), "sep_token": sep,
              "sem_vocab_size": sem_meta["vocab_size"], "sem_seq_len": sem.shape[2], "sem_grid": sem_meta["grid"],
              "vq_vocab_size": vq_meta["vocab_size"], "vq_seq_len": vq.shape[2], "vq_grid": vq_meta["grid"],
              "codebook_sha256": sem_meta["codebook_sha256"], "vq_sha256": vq_meta["vq_sha256"]}

    def make_batch(index, view):
        prefix = torch.from_numpy(sem[index, view].astype(np.int64))
        prefix = torch.cat([prefix, torch.full((len(index), 1), sep)], dim=1)
        return prefix, torch.from_numpy(vq[index, view].astype(np.int64))

    inputs = {"tokens": Path(tokens_dir) / "train.npy", "tokens_meta": Path(tokens_dir) / "meta.json",
              "vq_tokens": Path(vq_tokens_dir) / "train.npy", "vq_tokens_meta": Path(vq_tokens_dir) / "meta.json"}
    _train(config, "stage2", gpt_cfg, make_batch, sem.shape[:2], record, inputs, out_dir)


def _train(config: dict, stage: str, gpt_cfg: GPTConfig, make_batch, cache_shape: tuple, record: dict,
           inputs: dict, out_dir: str | Path) -> None:
    """The shared loop. `make_batch(image_index, view_index)` -> (prefix, targets) LongTensors."""
    tc, device, out_dir = config[stage], resolve_device(config), Path(out_dir)
    record = {**record, "preset": tc["preset"], "seed": config["seed"], "training": tc}
    partial = out_dir.with_name(out_dir.name + ".partial")
    torch.manual_seed(config["seed"])
    model = GPT(gpt_cfg).to(device)
    optimizer = make_optimizer(model, tc)
    generator = torch.Generator().manual_seed(config["seed"])
    step = _resume(partial, record, model, optimizer, generator)
    num_images, num_views = cache_shape

    model.train()
    with (partial / "log.tsv").open("a") as log:
        while step < tc["steps"]:
            step += 1
            start = time.perf_counter()
            index = torch.randint(num_images, (tc["batch_size"],), generator=generator).numpy()
            view = torch.randint(num_views, (tc["batch_size"],), generator=generator).numpy()
            prefix, targets = (t.to(device) for t in make_batch(index, view))
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc["precision"] == "bf16"):
                logits = model(prefix, targets[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   label_smoothing=tc["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"]).item()
            optimizer.step()
            loss = loss.item()
            if not math.isfinite(loss):
                raise ValueError(f"{stage}: loss became {loss} at step {step}; try a lower {stage}.lr")
            rate = targets.numel() / (time.perf_counter() - start)
            log.write(f"{step}\t{loss:.5f}\t{lr:.6g}\t{rate:.0f}\t{grad_norm:.4f}\n")
            log.flush()
            if step % tc["checkpoint_every"] == 0 and step < tc["steps"]:
                with atomic_dir(partial / "checkpoint") as tmp:
                    _write_checkpoint(tmp, model, optimizer, generator, step)

    with atomic_dir(out_dir) as tmp:
        _write_checkpoint(tmp, model, optimizer, generator, step)
        shutil.copy(partial / "log.tsv", tmp / "log.tsv")
        write_json(tmp / "model.json", {**record, "final_loss": loss,
                                        "provenance": provenance({"seed": config["seed"], stage: tc}, inputs)})
    shutil.rmtree(partial)
    print(f"{stage}: {step} steps, final loss {loss:.4f}")


def _resume(partial: Path, record: dict, model: GPT, optimizer, generator: torch.Generator) -> int:
    """Load the checkpoint in `partial` if there is one (it must have been made for the same record);
    otherwise start `partial` afresh. Returns the step to continue from."""
    checkpoint = partial / "checkpoint"
    if not checkpoint.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "log.tsv").write_text(LOG_HEADER)
        write_json(partial / "record.json", record)
        return 0
    saved = read_json(partial / "record.json")
    differ = sorted(k for k in record.keys() | saved.keys() if record.get(k) != saved.get(k))
    if differ:
        raise ValueError(f"the checkpoint in {partial} was made with other {', '.join(differ)} "
                         f"(e.g. {differ[0]}: {saved.get(differ[0])!r}, now {record.get(differ[0])!r}); "
                         f"delete {partial} to start over")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(checkpoint / "model.safetensors", device=str(device)))
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    # the log may run past the checkpoint: drop the steps that will be redone
    rows = (partial / "log.tsv").read_text().splitlines(keepends=True)
    (partial / "log.tsv").write_text("".join(rows[:1 + state["step"]]))
    print(f"resuming from step {state['step']} in {checkpoint}")
    return state["step"]


def _write_checkpoint(directory: Path, model: GPT, optimizer, generator: torch.Generator, step: int) -> None:
    save_file(model.state_dict(), directory / "model.safetensors")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state()},
               directory / "state.pt")
