"""Stage-1 training throughput: digit's GPT against a straightforward nanoGPT-style reference.

Both models have the same shape and see the same batches; a step is forward, label-smoothed
cross-entropy, backward and an AdamW update (the reference: torch's default AdamW; digit: its
training optimizer). Printed: tokens/s of the reference (eager, fp32),
of digit's model in fp32, in bf16 autocast and, with --compile, under torch.compile (in the
faster of the two precisions); the ratios
to the reference; and on CUDA the model FLOPs utilisation (MFU) against the GPU's bf16 peak.

    python benchmarks/train_throughput.py                      # tiny preset on this machine
    python benchmarks/train_throughput.py --preset base --batch 32 --device cuda --compile
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import CLASSES, add_device_argument, add_stage1_shape_arguments, median_seconds, stage1_config

from digit.generate.gpt import GPT, GPTConfig
from digit.generate.train import make_optimizer

# dense bf16 tensor-core peak, FLOP/s, of the GPUs MFU is reported for
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class ReferenceBlock(nn.Module):
    """nanoGPT's block with its plain attention path: explicit masked softmax, no fused kernel."""

    def __init__(self, d: int, n_head: int, n_ffn: int, seq_len: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, n_ffn), nn.Linear(n_ffn, d)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(d, 2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        T = cfg.prefix_len + cfg.seq_len - 1
        self.wte = nn.Embedding(cfg.vocab_size + cfg.prefix_vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(T, cfg.n_embd)
        self.blocks = nn.Sequential(*(ReferenceBlock(cfg.n_embd, cfg.n_head, cfg.n_ffn, T) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.vocab_size = cfg.vocab_size

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        idx = torch.cat([prefix + self.vocab_size, tokens], 1)
        x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))[:, prefix.shape[1] - 1:]


def train_step(model, optimizer, prefix, tokens, bf16: bool, device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(prefix, tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage1_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    add_device_argument(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = stage1_config(args)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(CLASSES, (args.batch, 1), generator=generator).to(device)
    tokens = torch.randint(args.vocab, (args.batch, args.seq_len), generator=generator).to(device)
    tokens_per_step = args.batch * args.seq_len
    opt_cfg = {"lr": 1e-4, "weight_decay": 0.01}

    def rate(model, bf16=False, reference=False):
        optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
                     if reference else make_optimizer(model, opt_cfg))
        seconds = median_seconds(lambda: train_step(model, optimizer, prefix, tokens, bf16, device),
                                 warmup=3, repeats=args.steps, device=device)
        return tokens_per_step / seconds

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {n_params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, "
          f"vocab {args.vocab}, device {device}")
    results = {"reference (nanoGPT-style, eager fp32)": rate(ReferenceGPT(cfg).to(device), reference=True),
               "digit fp32": rate(model)}
    results["digit bf16 autocast"] = rate(model, bf16=True)
    if args.compile:  # in the precision that is fast on this device
        bf16 = results["digit bf16 autocast"] > results["digit fp32"]
        results[f"digit {'bf16 autocast' if bf16 else 'fp32'} + compile"] = rate(torch.compile(model), bf16=bf16)
    reference = results["reference (nanoGPT-style, eager fp32)"]
    for name, value in results.items():
        print(f"{name:34s} {value:12,.0f} tokens/s   {value / reference:5.2f}x reference")
    if device.type == "cuda":
        # PaLM's estimate: 6 FLOPs per parameter per token, plus attention
        flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * args.seq_len
        name = torch.cuda.get_device_name(device)
        peak = next((p for gpu, p in PEAK_BF16.items() if gpu in name), None)
        best = max(v for k, v in results.items() if "bf16" in k)
        achieved = best * flops_per_token
        print(f"best bf16: {achieved / 1e12:.1f} TFLOP/s on {name}"
              + (f", MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""))


if __name__ == "__main__":
    main()
