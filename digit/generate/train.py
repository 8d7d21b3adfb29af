"""Training of the two generative stages: one loop, two ways of making a batch.

Stage 1 (run_train_ar): class token -> discriminative tokens. Stage 2 (run_train_decoder):
[sem tokens, sep] -> VQ tokens of the same image view. Each step draws images and one of their
cached views at random. Checkpoints go to `<out_dir>.partial/` (every checkpoint_every steps, and
when a launcher asks the run to stop); running the same command again resumes there, and `out_dir`
appears only when training has finished.

Under torchrun or submitit the loop runs data-parallel (DistributedDataParallel). Every process
draws the same global batch from the same generator and trains on its own slice of it, in
`grad_accum_steps` micro-batches; so the result does not depend on how the batch is split.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from digit.generate.gpt import GPT, PRESETS, GPTConfig, mask_ratio
from digit.runtime import distributed
from digit.runtime.checkpoint import PartialRun, write_state
from digit.runtime.config import resolve_device
from digit.runtime.io import atomic_dir, read_json, write_json
from digit.runtime.progress import TrainingLog, tensorboard_dir
from digit.runtime.schedule import cosine
from digit.runtime.token_cache import load_checked_cache
from digit.stages import provenance

LOG_HEADER = "step\tloss\tlr\ttokens_per_s\tgrad_norm\n"
IGNORE = -100  # target of a position without loss (cross_entropy's ignore_index)
STAGE_NAMES = {"stage1": "train_ar", "stage2": "train_decoder"}  # config section -> pipeline stage


def learning_rate(step: int, tc: dict) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps` or inverse-sqrt decay (fairseq)."""
    warmup = tc["warmup_steps"]
    if step <= warmup:
        return tc["lr"] * step / warmup
    if tc["schedule"] == "cosine":
        progress = (step - warmup) / max(1, tc["steps"] - warmup)
        return tc["lr"] * cosine(progress)
    return tc["lr"] * math.sqrt(max(1, warmup) / step)


def make_optimizer(model: nn.Module, tc: dict) -> torch.optim.AdamW:
    """AdamW with weight decay on the linear weights only (not on norms and embeddings); the fused
    implementation (one kernel for all parameters) on the CPU and CUDA."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=tc["lr"], betas=(0.9, 0.98), fused=fused)


def run_train_ar(config: dict, tokens_dir: str | Path, out_dir: str | Path) -> None:
    """Stage 1. Class-conditional: the class id is the prefix; with stage1.class_dropout > 0 it is
    replaced by the null class (id num_classes) that often, which classifier-free guidance needs.
    Unconditional: the prefix is the start token 0. With stage1.tokens: vq (the paper's VQ-token
    baseline) it learns the VQ token cache instead, which the VQ decoder renders without stage 2."""
    tc = config["stage1"]
    vocab = config["kmeans"]["k"] if tc["tokens"] == "discriminative" else config["vq"]["codebook_size"]
    tokens, labels, meta = load_checked_cache(tokens_dir, tc["tokens"], vocab)
    if labels.min() < 0 or labels.max() >= meta["num_classes"]:
        raise ValueError(f"{tokens_dir}/train_labels.npy has labels outside 0..{meta['num_classes'] - 1}")
    conditional = tc["class_conditional"]
    if tc["class_dropout"] and not conditional:
        raise ValueError("stage1.class_dropout > 0 needs stage1.class_conditional: true")
    null_class = meta["num_classes"] if tc["class_dropout"] else None
    prefix_vocab_size = 1 if not conditional else meta["num_classes"] + (null_class is not None)
    gpt_cfg = GPTConfig(vocab_size=meta["vocab_size"], seq_len=tokens.shape[2],
                        prefix_vocab_size=prefix_vocab_size, prefix_len=1, arch=tc["arch"],
                        **PRESETS[tc["preset"]])
    record = {"stage": "stage1", "model": asdict(gpt_cfg), "class_conditional": conditional,
              "null_class": null_class, "num_classes": meta["num_classes"], "classes": meta["classes"],
              "vocab_size": meta["vocab_size"], "seq_len": tokens.shape[2], "grid": meta["grid"], "tokens": tc["tokens"]}
    # what the tokens are the codes of: the K-means codebook, or the VQ model of the baseline
    record |= {key: meta[key] for key in ("codebook_sha256", "vq_sha256") if key in meta}
    labels = torch.from_numpy(labels)

    def draw(generator, n):
        return {"drop": torch.rand(n, generator=generator) < tc["class_dropout"]} if null_class is not None else {}

    def make_batch(index, view, drop=None):
        targets = torch.from_numpy(tokens[index, view].astype(np.int64))
        if not conditional:
            prefix = torch.zeros(len(index), dtype=torch.long)
        else:
            prefix = labels[index] if drop is None else torch.where(drop, null_class, labels[index])
        return prefix[:, None], targets[:, :-1], targets

    inputs = {"tokens": Path(tokens_dir) / "train.npy", "tokens_meta": Path(tokens_dir) / "meta.json"}
    _train(config, "stage1", gpt_cfg, make_batch, draw, tokens.shape[:2], record, inputs, out_dir)


def run_train_decoder(config: dict, tokens_dir: str | Path, vq_tokens_dir: str | Path, out_dir: str | Path) -> None:
    sem, sem_labels, sem_meta = load_checked_cache(tokens_dir, "discriminative", config["kmeans"]["k"])
    vq, vq_labels, vq_meta = load_checked_cache(vq_tokens_dir, "vq", config["vq"]["codebook_size"])
    # the pairs are (sem, vq) tokens of the same image in the same view
    same = {"number of images": len(sem) == len(vq), "views": sem_meta["views"] == vq_meta["views"],
            "random-crop seeds": sem_meta.get("view_seed") == vq_meta.get("view_seed"),
            "labels": np.array_equal(sem_labels, vq_labels)}
    if not all(same.values()):
        raise ValueError(f"token caches {tokens_dir} and {vq_tokens_dir} do not hold the same images: their "
                         + ", ".join(name for name, ok in same.items() if not ok) + " differ")
    sep, decoder = sem_meta["vocab_size"], config["stage2"]["decoder"]
    gpt_cfg = GPTConfig(vocab_size=vq_meta["vocab_size"], seq_len=vq.shape[2], prefix_vocab_size=sep + 1,
                        prefix_len=sem.shape[2] + 1, causal=decoder == "ar", arch=config["stage2"]["arch"],
                        **PRESETS[config["stage2"]["preset"]])
    record = {"stage": "stage2", "decoder": decoder, "model": asdict(gpt_cfg), "sep_token": sep,
              "sem_vocab_size": sem_meta["vocab_size"], "sem_seq_len": sem.shape[2], "sem_grid": sem_meta["grid"],
              "vq_vocab_size": vq_meta["vocab_size"], "vq_seq_len": vq.shape[2], "vq_grid": vq_meta["grid"],
              "codebook_sha256": sem_meta["codebook_sha256"], "vq_sha256": vq_meta["vq_sha256"]}

    def draw(generator, n):
        if decoder == "ar":
            return {}
        return {"mask_u": torch.rand(n, generator=generator), "mask_noise": torch.rand(n, vq.shape[2], generator=generator)}

    def make_batch(index, view, mask_u=None, mask_noise=None):
        prefix = torch.from_numpy(sem[index, view].astype(np.int64))
        prefix = torch.cat([prefix, torch.full((len(index), 1), sep)], dim=1)
        targets = torch.from_numpy(vq[index, view].astype(np.int64))
        if decoder == "ar":
            return prefix, targets[:, :-1], targets
        # MaskGIT: mask a cosine-scheduled number of random positions (at least one); loss on those only
        count = (mask_ratio(mask_u) * targets.shape[1]).ceil().clamp(min=1)
        masked = mask_noise.argsort(-1).argsort(-1) < count[:, None]
        return prefix, targets.masked_fill(masked, gpt_cfg.vocab_size), targets.masked_fill(~masked, IGNORE)

    inputs = {"tokens": Path(tokens_dir) / "train.npy", "tokens_meta": Path(tokens_dir) / "meta.json",
              "vq_tokens": Path(vq_tokens_dir) / "train.npy", "vq_tokens_meta": Path(vq_tokens_dir) / "meta.json"}
    _train(config, "stage2", gpt_cfg, make_batch, draw, sem.shape[:2], record, inputs, out_dir)


def load_stage(stage_dir: str | Path, device) -> tuple[GPT, dict]:
    """A trained stage (the output of run_train_ar or run_train_decoder), in eval mode, and its model.json."""
    stage_dir = Path(stage_dir)
    meta = read_json(stage_dir / "model.json")
    model = GPT(GPTConfig(**meta["model"]))
    model.load_state_dict(load_file(stage_dir / "model.safetensors"))
    return model.to(device).eval(), meta


def micro_batch_size(tc: dict, stage: str, world_size: int) -> int:
    """Sequences per forward pass: the global batch split over processes and accumulation steps."""
    parts = world_size * tc["grad_accum_steps"]
    if tc["batch_size"] % parts:
        raise ValueError(f"{stage}.batch_size {tc['batch_size']} does not split into {world_size} process(es) "
                         f"x {stage}.grad_accum_steps {tc['grad_accum_steps']} equal micro-batches")
    return tc["batch_size"] // parts


def _train(config: dict, stage: str, gpt_cfg: GPTConfig, make_batch, draw, cache_shape: tuple, record: dict,
           inputs: dict, out_dir: str | Path) -> None:
    """The shared loop. `draw(generator, n)` -> the stage's random numbers for a global batch of n
    sequences, {name: tensor with n rows}; `make_batch(image_index, view_index, **a slice of them)`
    -> (prefix, inputs, targets) LongTensors, targets IGNORE where there is no loss."""
    tc, out_dir = config[stage], Path(out_dir)
    procs, device = distributed.setup(resolve_device(config))
    micro = micro_batch_size(tc, stage, procs.world_size)
    record = {**record, "preset": tc["preset"], "seed": config["seed"], "training": _training_record(tc)}
    run = PartialRun(out_dir, record, LOG_HEADER)
    torch.manual_seed(config["seed"])
    model = GPT(gpt_cfg).to(device)
    model.activation_checkpointing = tc["activation_checkpointing"]
    optimizer = make_optimizer(model, tc)
    generator = torch.Generator().manual_seed(config["seed"])
    state = {"model": model, "optimizer": optimizer, "generator": generator}
    if procs.is_main:
        run.start_or_check()
    procs.barrier()
    resumed = run.resume(state, device, truncate_log=procs.is_main)
    step = resumed["step"] if resumed else 0
    net = DistributedDataParallel(model) if procs.world_size > 1 else model
    if tc["compile"]:
        net = torch.compile(net)
    num_images, num_views = cache_shape

    model.train()
    log = run.log_path.open("a") if procs.is_main else contextlib.nullcontext()
    # the live view: a line at a steady interval in the job's log, TensorBoard curves beside the logs
    progress = TrainingLog(stage, tc["steps"], step, tensorboard_dir(out_dir, stage)) if procs.is_main else None
    with log:
        while step < tc["steps"]:
            if procs.any(distributed.stop_requested.is_set()):
                _stop(procs, run, state, step, stage)
            step += 1
            start = time.perf_counter()
            # the global batch: the same draws in every process, whatever the split
            index = torch.randint(num_images, (tc["batch_size"],), generator=generator).numpy()
            view = torch.randint(num_views, (tc["batch_size"],), generator=generator).numpy()
            draws = draw(generator, tc["batch_size"])
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = torch.zeros((), device=device)
            first = procs.rank * micro * tc["grad_accum_steps"]
            for m in range(tc["grad_accum_steps"]):
                part = slice(first + m * micro, first + (m + 1) * micro)
                prefix, tokens_in, targets = (t.to(device) for t in make_batch(
                    index[part], view[part], **{name: value[part] for name, value in draws.items()}))
                last = m == tc["grad_accum_steps"] - 1
                # gradients are averaged over the processes once, after the last micro-batch
                with contextlib.nullcontext() if last or procs.world_size == 1 else net.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc["precision"] == "bf16"):
                        logits = net(prefix, tokens_in)
                    micro_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                                 label_smoothing=tc["label_smoothing"]) / tc["grad_accum_steps"]
                    micro_loss.backward()
                loss += micro_loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"]).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = procs.mean(loss).item()
            if not math.isfinite(loss):
                raise ValueError(f"{stage}: loss became {loss} at step {step}; try a lower {stage}.lr")
            if procs.is_main:
                rate = tc["batch_size"] * gpt_cfg.seq_len / (time.perf_counter() - start)
                log.write(f"{step}\t{loss:.5f}\t{lr:.6g}\t{rate:.0f}\t{grad_norm:.4f}\n")
                log.flush()
                checkpoint = step % tc["checkpoint_every"] == 0 and step < tc["steps"]
                progress.step(step, {"loss": loss, "lr": lr, "tokens_per_s": rate, "grad_norm": grad_norm},
                              checkpoint=checkpoint)
                if checkpoint:
                    run.save(state, step)

    if procs.is_main:
        progress.close()
        with atomic_dir(out_dir) as tmp:
            write_state(tmp, state, step)
            shutil.copy(run.log_path, tmp / "log.tsv")
            write_json(tmp / "model.json", {**record, "final_loss": loss,
                                            "provenance": provenance(config, STAGE_NAMES[stage], inputs)})
        run.finish()
        print(f"{stage}: {step} steps, final loss {loss:.4f}")
    procs.barrier()
    distributed.teardown(procs)


def _stop(procs, run: PartialRun, state: dict, step: int, stage: str) -> None:
    """Checkpoint the finished steps and raise Stopped (the launcher asked; every process calls this)."""
    if procs.is_main:
        run.save(state, step)
    procs.barrier()
    raise distributed.Stopped(f"{stage}: stopped after step {step}, checkpoint in {run.dir}")


# how the run is executed, not what it computes: a checkpoint may resume under other values
EXECUTION_KEYS = ("compile", "activation_checkpointing", "checkpoint_every")


def _training_record(tc: dict) -> dict:
    return {key: value for key, value in tc.items() if key not in EXECUTION_KEYS}
