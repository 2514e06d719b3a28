"""Small models for the tests: LoRA-shaped, PEFT-shaped, mixed weight/bias, tied, root-level params."""

from __future__ import annotations

import torch
import torch.nn as nn

DIM = 16


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (PEFT's attribute names)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 4, peft_style: bool = False) -> None:
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out, bias=False)
        self.base_layer.weight.requires_grad_(False)
        if peft_style:  # peft.tuners.lora.Linear layout: ModuleDicts keyed by adapter name
            self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, rank, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d_out, bias=False)})
        else:
            self.lora_A = nn.Linear(d_in, rank, bias=False)
            self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self._b().weight, std=0.02)  # non-zero so every param gets a useful gradient

    def _a(self) -> nn.Linear:
        return self.lora_A["default"] if isinstance(self.lora_A, nn.ModuleDict) else self.lora_A

    def _b(self) -> nn.Linear:
        return self.lora_B["default"] if isinstance(self.lora_B, nn.ModuleDict) else self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self._b()(self._a()(x))


class Block(nn.Module):
    def __init__(self, dim: int, peft_style: bool = False, mixed_bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = LoRALinear(dim, dim, peft_style=peft_style)
        self.mlp = LoRALinear(dim, dim, peft_style=peft_style)
        # A module with a frozen weight and a trainable bias: the split must be per parameter.
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj.weight.requires_grad_(False)
        self.proj.bias.requires_grad_(mixed_bias)
        self.norm.weight.requires_grad_(False)
        self.norm.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm(x))
        return h + self.proj(torch.relu(self.mlp(h)))


class ToyLM(nn.Module):
    """Embedding -> blocks -> norm -> head, with optional tied head and a root-level parameter."""

    def __init__(
        self,
        vocab: int = 32,
        dim: int = DIM,
        n_layers: int = 3,
        peft_style: bool = False,
        mixed_bias: bool = True,
        tied: bool = False,
        frozen_block: bool = True,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.tok.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(dim))  # root-level, trainable
        self.register_buffer("pos", torch.randn(64, dim) * 0.02)  # a persistent buffer
        self.layers = nn.ModuleList(Block(dim, peft_style, mixed_bias) for _ in range(n_layers))
        if frozen_block:  # a unit with no trainable parameter at all
            for p in self.layers[-1].parameters():
                p.requires_grad_(False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        else:
            self.head.weight.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) * self.scale + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def make_model(seed: int = 0, **kwargs) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(**kwargs)


def batch(step: int, rank: int, vocab: int = 32, bsz: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, vocab, (bsz, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]
