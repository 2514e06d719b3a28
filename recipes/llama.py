"""A small Llama-style causal LM with LoRA adapters, defined here so nothing is downloaded.

RMSNorm, causal self-attention (SDPA), SwiGLU MLP. With ``lora_rank > 0`` every linear of every block
is a frozen base plus a trainable rank-r update (PEFT's names: ``base_layer``, ``lora_A``,
``lora_B``), and the token embedding, norms and output head are frozen. With ``lora_rank == 0`` it is a
plain model with every parameter trainable (freeze parts of it with ``FreezePolicy.freeze``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    hidden_dim: int = 1376
    lora_rank: int = 8
    lora_alpha: float = 16.0


class LoRALinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=False)
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.scaling = alpha / rank
        nn.init.zeros_(self.lora_B.weight)

    def reset_lora_parameters(self, adapter_name: str | None = None, init_lora_weights: bool = True) -> None:
        """PEFT's LoRA init (same signature): A as nn.Linear (kaiming), B zero; `load_pretrained` calls it."""
        self.lora_A.reset_parameters()
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        def lin(d_in: int, d_out: int) -> nn.Module:
            if cfg.lora_rank == 0:
                return nn.Linear(d_in, d_out, bias=False)
            return LoRALinear(d_in, d_out, cfg.lora_rank, cfg.lora_alpha)

        self.n_heads = cfg.n_heads
        self.attn_norm = RMSNorm(cfg.dim)
        self.wq, self.wk, self.wv, self.wo = (lin(cfg.dim, cfg.dim) for _ in range(4))
        self.mlp_norm = RMSNorm(cfg.dim)
        self.w1, self.w3 = lin(cfg.dim, cfg.hidden_dim), lin(cfg.dim, cfg.hidden_dim)
        self.w2 = lin(cfg.hidden_dim, cfg.dim)
        for norm in (self.attn_norm, self.mlp_norm):
            norm.weight.requires_grad_(cfg.lora_rank == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        # heads as -1: under tensor parallelism a colwise wq/wk/wv gives each rank n_heads / tp of them
        q, k, v = (w(h).view(b, t, -1, d // self.n_heads).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.wo(a)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def tp_plan() -> dict:
    """torchtitan's TP plan for this model's blocks: q, k, v, w1, w3 colwise, wo, w2 rowwise (the
    embedding, norms and output whole on every TP rank); `fsdp_frozen.lora_tp_plan` places the adapters."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{f"layers.*.{n}": ColwiseParallel() for n in ("wq", "wk", "wv", "w1", "w3")},
            **{f"layers.*.{n}": RowwiseParallel() for n in ("wo", "w2")}}


class LlamaLoRA(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for p in (self.tok_embeddings.weight, self.norm.weight, self.output.weight):
            p.requires_grad_(cfg.lora_rank == 0)

    def get_output_embeddings(self) -> nn.Module:
        """The output head (transformers' name for it), where recipes/loss.py computes the loss."""
        return self.output

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))
