"""A tiny randomly initialised Hugging Face ``LlamaForCausalLM`` with PEFT LoRA, and its adapter export.

Needs the ``hf`` extra (transformers + peft). Nothing is downloaded: the model is built from a config
object. The export writes PEFT's own format (``adapter_model.safetensors`` + ``adapter_config.json``)
through ``PeftModel.save_pretrained``, so ``PeftModel.from_pretrained(base, path)`` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(cfg: Any, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )


def build_hf_base(cfg: Any, vocab_size: int) -> nn.Module:
    """The base model alone (what `PeftModel.from_pretrained` is given), seeded by ``cfg.seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hf_config(cfg, vocab_size))


def build_hf_lora(cfg: Any, vocab_size: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    base = build_hf_base(cfg, vocab_size)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=TARGET_MODULES, lora_dropout=0.0,
                      init_lora_weights=True)
    return get_peft_model(base, lora)


def export_peft_adapter(model: nn.Module, path: Path) -> None:
    """Gather the trainable (adapter) weights and write them with PEFT's ``save_pretrained`` on rank 0.

    Collective: every rank gathers the full adapter tensors (small); rank 0 writes.
    """
    full = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    if dist.get_rank() == 0:
        model.save_pretrained(str(path), state_dict=full, safe_serialization=True)
    dist.barrier()
