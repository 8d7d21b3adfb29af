"""The transformer of both generative stages: a GPT over [prefix, targets].

Stage 1 (the DiGIT GPT): prefix = one class token (or one start token when unconditional),
targets = the T discriminative tokens. The input [cond, t1..t_{T-1}] predicts [t1..tT]; the
paper's extra end token is left out because every sequence has the same length.
Stage 2, AR pixel decoder: prefix = [sem x T_sem, sep], targets = the VQ tokens; a causal
prefix LM whose loss covers the VQ part only.
Stage 2, NAR pixel decoder (MaskGIT, `causal=False`): the same prefix, then all T VQ tokens with
some replaced by a mask token (id vocab_size); attention is bidirectional and every VQ position
predicts its own token. Decoding fills the masks in a few parallel steps (generate_masked).

Prefix and targets have their own token and learned position tables (different vocabularies);
the blocks, the final norm and the output head are shared code. Input and output embeddings are
untied, as in DiGIT.

`arch` picks the network form:
- prenorm: GPT-2 / nanoGPT. Pre-LN blocks and a final LayerNorm, no dropout, no biases, N(0, 0.02)
  init with depth-scaled residual projections. Without biases the class-conditional count is
  DiGIT's 219M (base, K=8192) and 732M (large, K=16384).
- fairseq_postln: the official stage-1 network (DiGIT's `stlm`: fairseq's TransformerDecoder with
  decoder_normalize_before false). Each block is x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))),
  no final LayerNorm.
- fairseq_prenorm: the official stage-2 network (`st2vtlm`, `st2vtlm_nar`: the same decoder with
  decoder_normalize_before true): x = x + drop(attn(LN(x))); x = x + drop(ffn(LN(x))), final LayerNorm.
Both fairseq forms have fairseq's defaults as DiGIT leaves them: dropout 0.1 on the embeddings and on
the attention and FFN outputs (none on the attention probabilities or the FFN activation), biases in
every linear layer but the output head (fairseq's output projection has none), exact GELU, token
embeddings scaled by sqrt(d) before the positions are added, and fairseq's init (token, position and
output tables N(0, d^-1/2); q, k, v Xavier-uniform with gain 2^-1/2; attention output Xavier-uniform,
bias 0; FFN and q/k/v biases PyTorch's default). Where the official model differs only in layout it is
kept as is here: fairseq shares one token table between prefix and targets (ids offset) and has K + 5
tokens (4 specials and <n>) and 1026 learned positions (1024 + fairseq's padding offset), of which
DiGIT uses 257 (stage 1) or 256 + 257 (stage 2, two tables); here each table holds the rows it uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# tiny: the CPU demo; in fp32 on 2 cores one step of 32 x 64 tokens takes ~0.12 s (stage 1).
# base: DiGIT's config/stage1/dino_base.yaml. large: DiGIT ships no config; width, depth and FFN are
# inferred from its 732M (and the probe's 1536 features); the head count is not known (16 assumed).
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_ffn=512),
    # The paper's 39M GPT of the encoder ablation (Fig. 4a), whose shape is not published: width 512 with
    # heads of 64 and FFN 4d (fairseq's transformer_lm width), and the depth whose count by the paper's
    # convention (tests/test_gpt.py, K=8192) is nearest 39M: 10 layers 40.4M (9: 37.3M).
    "small": dict(n_layer=10, n_head=8, n_embd=512, n_ffn=2048),
    "base": dict(n_layer=16, n_head=16, n_embd=1024, n_ffn=4096),
    "large": dict(n_layer=24, n_head=16, n_embd=1536, n_ffn=6144),
}
ARCHS = ("prenorm", "fairseq_postln", "fairseq_prenorm")
FAIRSEQ_DROPOUT = 0.1  # fairseq's default `dropout`, which DiGIT's configs keep


@dataclass
class GPTConfig:
    vocab_size: int         # target vocabulary: K codebook tokens (stage 1) or VQ codes (stage 2)
    seq_len: int            # target tokens per sequence
    prefix_vocab_size: int  # prefix vocabulary: classes (stage 1), K sem tokens + sep (stage 2)
    prefix_len: int         # prefix tokens: 1 (stage 1), T_sem + 1 (stage 2)
    n_layer: int
    n_head: int
    n_embd: int
    n_ffn: int
    causal: bool = True     # False: bidirectional, masked-token prediction (MaskGIT)
    arch: str = "prenorm"   # prenorm | fairseq_postln (official stage 1) | fairseq_prenorm (official stage 2)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r}: expected one of {', '.join(ARCHS)}")

    @property
    def fairseq(self) -> bool:
        return self.arch != "prenorm"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.causal = cfg.causal
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.fairseq)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.fairseq)

    def forward(self, x: torch.Tensor, cache: tuple | None = None, start: int = 0) -> torch.Tensor:
        """x [B, L, d] at sequence positions start..start+L-1. With a KV cache ([B, H, max_len, hd]
        key and value buffers) the new keys and values are stored and the queries attend to every
        cached position up to their own."""
        B, L, d = x.shape
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(d, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            k_cache, v_cache = cache
            end = start + L
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            mask = torch.arange(start, end, device=x.device)[:, None] >= torch.arange(end, device=x.device)
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.n_ffn, bias=cfg.fairseq)
        self.proj = nn.Linear(cfg.n_ffn, cfg.n_embd, bias=cfg.fairseq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block, or post-LN (fairseq_postln): the norm after the residual sum."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.post_ln = cfg.arch == "fairseq_postln"
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(FAIRSEQ_DROPOUT if cfg.fairseq else 0.0)  # p=0 returns its input

    def forward(self, x: torch.Tensor, cache: tuple | None = None, start: int = 0) -> torch.Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.drop(self.attn(x, cache, start)))
            return self.ln_2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.ln_1(x), cache, start))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.prefix_emb = nn.Embedding(cfg.prefix_vocab_size, cfg.n_embd)
        self.prefix_pos = nn.Embedding(cfg.prefix_len, cfg.n_embd)
        if cfg.causal:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.tok_pos = nn.Embedding(cfg.seq_len - 1, cfg.n_embd)  # the last target is never an input
        else:
            self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)  # + the mask token
            self.tok_pos = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.fairseq else 1.0
        self.drop = nn.Dropout(FAIRSEQ_DROPOUT if cfg.fairseq else 0.0)  # on the embeddings
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.Identity() if cfg.arch == "fairseq_postln" else nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # recompute each block's activations in the backward pass instead of storing them
        self.activation_checkpointing = False
        if cfg.fairseq:
            self._init_fairseq()
        else:
            self.apply(self._init_weights)
            # GPT-2: scale the residual projections by the depth
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def _init_fairseq(self) -> None:
        """fairseq's init: Embedding(), PositionalEmbedding(learned=True), the output projection and
        MultiheadAttention.reset_parameters; the FFN and the q/k/v biases keep nn.Linear's default.
        DiGIT's models do not re-initialise (no init_bert_params); read from fairseq 0.12.2, as DiGIT
        pins no fairseq version."""
        d = self.cfg.n_embd
        for table in (self.prefix_emb, self.prefix_pos, self.tok_emb, self.tok_pos, self.head):
            nn.init.normal_(table.weight, std=d ** -0.5)
        for block in self.blocks:
            for w in block.attn.qkv.weight.split(d):  # q, k, v: fairseq's separate d x d projections
                nn.init.xavier_uniform_(w, gain=2 ** -0.5)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)

    def embed_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.embed_scale * self.prefix_emb(prefix) + self.prefix_pos.weight[: prefix.shape[1]]

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Target tokens [B, L] that sit at target positions start..start+L-1."""
        return self.embed_scale * self.tok_emb(tokens) + self.tok_pos.weight[start: start + tokens.shape[1]]

    def trunk(self, x: torch.Tensor, caches: list | None = None, start: int = 0,
              hidden: list | None = None) -> torch.Tensor:
        """Embedding dropout, the blocks and the final norm; every block's output is appended to
        `hidden` if given."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if caches is None and self.training and self.activation_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if caches is None else caches[i], start)
            if hidden is not None:
                hidden.append(x)
        return self.ln_f(x)

    @property
    def mask_token(self) -> int:
        return self.cfg.vocab_size

    def forward(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Causal: prefix [B, P] and the first t < T targets [B, t] -> logits [B, t + 1, V] of targets 1..t+1.
        Bidirectional: prefix [B, P] and all T targets [B, T], some masked -> logits [B, T, V] of each target."""
        x = torch.cat([self.embed_prefix(prefix), self.embed_tokens(tokens)], dim=1)
        first = prefix.shape[1] - 1 if self.cfg.causal else prefix.shape[1]
        return self.head(self.trunk(x)[:, first:])

    @torch.no_grad()
    def layer_means(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every block's output averaged over the token positions -> [B, n_layer, d]: the features
        of the linear probe. `tokens` [B, t] are targets 1..t (t < T), as in forward."""
        hidden = []
        self.trunk(torch.cat([self.embed_prefix(prefix), self.embed_tokens(tokens)], dim=1), hidden=hidden)
        return torch.stack([h[:, prefix.shape[1]:].mean(1) for h in hidden], dim=1)

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cfg_scale: float = 1.0, null_prefix: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the T targets after `prefix` [B, P] one at a time with a static KV cache -> [B, T].

        With cfg_scale != 1, classifier-free guidance: the batch also runs with `null_prefix` [1, P]
        (the unconditional prefix) and each token is drawn from uncond + cfg_scale * (cond - uncond).
        """
        guided = cfg_scale != 1.0
        if guided:
            if null_prefix is None:
                raise ValueError("classifier-free guidance needs the unconditional prefix (null_prefix)")
            prefix = torch.cat([prefix, null_prefix.expand_as(prefix)])
        cfg, (B, P) = self.cfg, prefix.shape
        dtype = torch.get_autocast_dtype(prefix.device.type) if torch.is_autocast_enabled(prefix.device.type) \
            else self.head.weight.dtype
        shape = (B, cfg.n_head, P + cfg.seq_len - 1, cfg.n_embd // cfg.n_head)
        caches = [(torch.empty(shape, dtype=dtype, device=prefix.device),
                   torch.empty(shape, dtype=dtype, device=prefix.device)) for _ in self.blocks]
        h = self.trunk(self.embed_prefix(prefix), caches, 0)[:, -1]
        tokens = []
        for i in range(cfg.seq_len):
            if i > 0:
                last = tokens[-1].repeat(2) if guided else tokens[-1]
                h = self.trunk(self.embed_tokens(last[:, None], i - 1), caches, P + i - 1)[:, -1]
            logits = self.head(h).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            tokens.append(sample_logits(logits, temperature, top_k, top_p, generator))
        return torch.stack(tokens, dim=1)


@torch.no_grad()
def generate_masked(model: GPT, prefix: torch.Tensor, steps: int, choice_temperature: float,
                    temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskGIT decoding of a bidirectional model: start with every target masked; at each step sample
    every masked position, keep the most confident samples and mask the rest again, fewer each step
    (cosine schedule). Confidence is the sample's log-probability plus Gumbel noise scaled by
    choice_temperature * (1 - progress), so early choices are more random. -> [B, T]."""
    B, T = prefix.shape[0], model.cfg.seq_len
    tokens = torch.full((B, T), model.mask_token, dtype=torch.long, device=prefix.device)
    for step in range(steps):
        logits = model(prefix, tokens).float()
        sampled = sample_logits(logits.flatten(0, 1), temperature, 0, top_p, generator).view(B, T)
        log_probs = logits.div(temperature).log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
        masked = tokens == model.mask_token
        sampled = torch.where(masked, sampled, tokens)
        remaining = masked_count(step + 1, steps, T)
        if remaining == 0:
            return sampled
        uniform = torch.rand(B, T, generator=generator, device=prefix.device).clamp_(1e-20, 1)
        gumbel = -torch.log(-torch.log(uniform))
        confidence = log_probs + choice_temperature * (1 - (step + 1) / steps) * gumbel
        confidence = confidence.masked_fill(~masked, float("inf"))  # decided tokens stay
        # the `remaining` least confident positions are masked again (never more than are masked now)
        remask = confidence.argsort(-1)[:, :remaining]
        tokens = sampled.scatter(1, remask, model.mask_token)
    return tokens


def masked_count(step: int, steps: int, length: int) -> int:
    """Tokens still masked after `step` of `steps` decoding steps: cosine schedule, 0 after the last."""
    return int(math.floor(length * math.cos(math.pi / 2 * step / steps)))


def mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Training: the fraction of targets to mask for uniform u in [0, 1) (cosine schedule)."""
    return torch.cos(math.pi / 2 * u)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits [B, V]: temperature, then top-k (0: off) and top-p (1.0: off)."""
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)
