"""Distillation: a frozen teacher, sharded with fsdp_frozen, trains a smaller student.

    torchrun --nproc-per-node 2 recipes/distill.py --config recipes/configs/distill.yaml [key=value ...]

The teacher is built on the meta device and entirely frozen: ``shard_with_freezing`` gives each of its
units one frozen group (its weights then come from ``teacher.checkpoint``, ``teacher.pretrained`` or a
random base written once, each rank reading only its shards), stored in bf16, with ``teacher.frozen_reshard`` = ``"never"`` (gathered once, no teacher communication
after the first step; costs the teacher's full bf16 bytes per rank) or ``"after_forward"`` (gathered
for each forward and freed: FSDP's memory). It runs under ``torch.no_grad``. The student trains on
``kd_weight * KL(teacher || student) * T^2 + (1 - kd_weight) * cross-entropy``, in
``train.loss_chunks`` chunks of tokens (recipes/loss.py; 0: unchunked): neither model's full logits
exist. Each chunk's teacher logits come from the teacher's hidden states and head (its root unit stays
gathered after its no-grad forward), the student's from its head inside the student's forward.
Progress bar, metrics, checkpoints (student + optimizer) and ``train.resume`` as in lora_finetune.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from config import DataConfig, OptimizerConfig, TrainConfig, parse_recipe_args  # noqa: E402
from data import VOCAB_SIZE, ByteBatches, generated_corpus  # noqa: E402
from llama import LlamaConfig, LlamaLoRA  # noqa: E402
from loss import check_chunks, distillation_loss, head_computes, model_loss, output_head  # noqa: E402
from runtime import init_runtime, random_base, resume_step, run_recipe, train_loop  # noqa: E402

from fsdp_frozen import FreezePolicy, describe, shard_with_freezing  # noqa: E402
from fsdp_frozen.checkpoint import load_checkpoint, load_pretrained  # noqa: E402


@dataclass
class TeacherConfig:
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    hidden_dim: int = 352
    lora_rank: int = 0  #: match the architecture of `checkpoint` (8 for a lora_finetune run)
    seed: int = 1
    checkpoint: str | None = None  #: fsdp_frozen checkpoint to load the teacher from (e.g. a lora_finetune run)
    #: Otherwise its weights: a Hugging Face safetensors directory; None: a random base written to
    #: OUTPUT_DIR/teacher_base (once) and loaded from there with load_pretrained.
    pretrained: str | None = None
    frozen_reshard: str = "never"  #: "never" or "after_forward"


@dataclass
class StudentConfig:
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 352
    seed: int = 0


@dataclass
class LossConfig:
    temperature: float = 2.0
    kd_weight: float = 0.9


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill"))


class DistillRecipe:
    def __init__(self, cfg: DistillConfig) -> None:
        check_chunks(cfg.train.loss_chunks, "train.loss_chunks")
        if cfg.teacher.frozen_reshard not in ("never", "after_forward"):
            raise ValueError(f"teacher.frozen_reshard must be 'never' or 'after_forward', got {cfg.teacher.frozen_reshard!r}")
        self.cfg = cfg
        self.device, self.mesh = init_runtime()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.train.output_dir)
        t, s = cfg.teacher, cfg.student
        teacher_cfg = LlamaConfig(VOCAB_SIZE, t.dim, t.n_layers, t.n_heads, t.hidden_dim, t.lora_rank)
        with torch.device("meta"):  # the teacher is built on meta; each rank allocates its shards only
            teacher = LlamaLoRA(teacher_cfg)
        with torch.device(self.device):
            torch.manual_seed(s.seed)
            student = LlamaLoRA(LlamaConfig(VOCAB_SIZE, s.dim, s.n_layers, s.n_heads, s.hidden_dim, lora_rank=0))
        teacher_policy = FreezePolicy(units=("layers.*",), freeze=("**",), frozen_reshard=t.frozen_reshard,
                                      frozen_dtype="bfloat16", param_dtype="bfloat16", reduce_dtype="float32")
        self.teacher = shard_with_freezing(teacher, self.mesh, teacher_policy)
        if t.checkpoint:  # e.g. a lora_finetune run: its adapters were trainable, here everything is frozen
            self.teacher.to_empty(device=self.device)
            load_checkpoint(t.checkpoint, self.teacher, allow_freezing_change=True, cast=True)
        else:
            def write(directory: Path) -> None:
                from safetensors.torch import save_file

                torch.manual_seed(t.seed)
                directory.mkdir(parents=True)
                save_file(LlamaLoRA(teacher_cfg).state_dict(), str(directory / "model.safetensors"))

            load_pretrained(self.teacher, t.pretrained or random_base(self.out / "teacher_base", write))
        self.student = shard_with_freezing(student, self.mesh, FreezePolicy(units=("layers.*",)))
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.optimizer.lr,
                                           weight_decay=cfg.optimizer.weight_decay)
        self.data = ByteBatches(generated_corpus(cfg.data.n_sentences, cfg.data.seed), cfg.data.batch_size,
                                cfg.data.seq_len, cfg.data.seed)
        self.trained = self.student  # what train_loop checkpoints with the optimizer
        self.start = resume_step(self.out, self.student, self.optimizer) if cfg.train.resume else 0
        if self.rank == 0:
            print(f"teacher:\n{describe(self.teacher)}\nstudent:\n{describe(self.student)}", flush=True)

    def loss(self, step: int) -> torch.Tensor:
        x, y = self.data.batch(step, self.rank, self.world)
        x, y = x.to(self.device), y.to(self.device)
        temp, w = self.cfg.loss.temperature, self.cfg.loss.kd_weight
        chunks = self.cfg.train.loss_chunks
        if chunks == 0:  # the unchunked reference: both models' full logits
            with torch.no_grad():
                teacher_logits = self.teacher(x).float()
            logits = self.student(x).float()
            kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(teacher_logits / temp, -1),
                          log_target=True, reduction="batchmean") * temp**2
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return w * kd + (1 - w) * ce
        # chunked (recipes/loss.py): the teacher's forward stops at its head's input; inside the student
        # head's one call, each chunk of tokens gets both models' logits, the loss and its gradient
        teacher_head, student_head = output_head(self.teacher), output_head(self.student)
        with torch.no_grad(), head_computes(teacher_head, lambda hidden: hidden):
            teacher_hidden = self.teacher(x)  # the teacher's root unit (its head) stays gathered after this
        return model_loss(self.student, lambda hidden: distillation_loss(
            hidden, student_head, teacher_hidden, teacher_head, y, temperature=temp, kd_weight=w, chunks=chunks), x)

    def train(self) -> list[float]:
        losses = train_loop(self)
        return losses

def main(argv: list[str] | None = None) -> list[float]:
    cfg, _ = parse_recipe_args(DistillConfig, __doc__, argv)
    return run_recipe(DistillRecipe(cfg))


if __name__ == "__main__":
    main()
