"""What every recipe needs at run time: device and process group, a progress bar, JSON-lines metrics,
and finding the checkpoint to resume from."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


#: whether `init_runtime` created the default process group (and `end_runtime` destroys it): a recipe
#: called in ranks that already have one (tests/test_recipes.py's pooled ranks) leaves it as it was
_OWNS_PROCESS_GROUP = False


def init_runtime() -> tuple[torch.device, DeviceMesh]:
    """CUDA + NCCL when a GPU is present, else CPU + gloo; a 1-D mesh over all ranks. Uses the default
    process group if one exists (`end_runtime` then leaves it), else creates it."""
    global _OWNS_PROCESS_GROUP
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        _OWNS_PROCESS_GROUP = True
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return device, init_device_mesh(device.type, (dist.get_world_size(),))


class ProgressBar:
    """One line on rank 0: step, loss, tokens/s. Redrawn in place on a terminal, printed every
    `every` steps otherwise (logs, CI).

    Not tqdm: off a terminal tqdm still writes carriage-return redraws (throttled by time, not by
    step), which land in a CI log as one long line; this prints one clean line per `every` steps."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = int(30 * step / max(self.total, 1))
        line = f"[{'#' * done}{'.' * (30 - done)}] step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, flush=True)


class MetricsLog:
    """``metrics.jsonl`` in the output directory, one JSON object per step, written by rank 0.

    On resume from step N, lines after step N (from the interrupted run) are dropped first, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, **record: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def latest_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """The complete ``step_N`` checkpoint with the largest N (a directory with DCP's .metadata)."""
    best = None
    for d in output_dir.glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / ".metadata").is_file() and (best is None or int(m.group(1)) > best[1]):
            best = (d, int(m.group(1)))
    return best


class Throughput:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def tokens_per_s(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.t, 1e-9)
        self.t = now
        return rate


def random_base(directory: Path, write: Any) -> str:
    """`directory`, holding a random pretrained base written once by rank 0 with ``write(path)``
    (into a temporary directory renamed when complete, so an interrupted write is redone); collective."""
    if dist.get_rank() == 0 and not directory.exists():
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        write(tmp)
        tmp.rename(directory)
    dist.barrier()
    return str(directory)


class Recipe(Protocol):
    """What `train_loop` needs of a recipe (each recipe's one class provides it)."""

    cfg: Any  #: has ``train`` (a config.TrainConfig) and ``data`` (a config.DataConfig)
    out: Path  #: OUTPUT_DIR
    rank: int
    world: int
    start: int  #: the last finished step (0, or the step resumed from)
    optimizer: torch.optim.Optimizer
    trained: torch.nn.Module  #: the module checkpointed with the optimizer

    def loss(self, step: int) -> torch.Tensor: ...


def train_loop(recipe: Recipe) -> list[float]:
    """The step loop every recipe shares; returns the mean loss per step (all ranks)."""
    from fsdp_frozen.checkpoint import save_checkpoint

    cfg = recipe.cfg.train
    metrics = MetricsLog(recipe.out / "metrics.jsonl", recipe.rank == 0, resume_step=recipe.start)
    bar = ProgressBar(cfg.steps, cfg.log_every, recipe.rank == 0)
    clock = Throughput()
    tokens = recipe.cfg.data.batch_size * recipe.cfg.data.seq_len * getattr(recipe, "data_world", recipe.world)
    if recipe.rank == 0:
        print(f"training steps {recipe.start + 1}..{cfg.steps} on {recipe.world} rank(s)", flush=True)
    losses = []
    for step in range(recipe.start + 1, cfg.steps + 1):
        loss = recipe.loss(step)
        loss.backward()
        recipe.optimizer.step()
        recipe.optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        value = mean.item() / recipe.world
        losses.append(value)
        rate = clock.tokens_per_s(tokens)
        metrics.write(step=step, loss=value, tokens_per_s=rate, lr=recipe.optimizer.param_groups[0]["lr"])
        bar.update(step, value, rate)
        if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint(recipe.out / f"step_{step}", recipe.trained, recipe.optimizer, extra={"step": step},
                            overwrite=True)
    return losses


def resume_step(output_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the latest ``step_N`` checkpoint under `output_dir` if there is one; the step to continue after."""
    from fsdp_frozen.checkpoint import load_checkpoint

    found = latest_checkpoint(output_dir)
    if found is None:
        return 0
    return int(load_checkpoint(found[0], model, optimizer)["step"])


def write_config(recipe: Any) -> None:
    """``OUTPUT_DIR/config.yaml``: the resolved config of this run (rank 0)."""
    import dataclasses

    import yaml

    if recipe.rank == 0:
        recipe.out.mkdir(parents=True, exist_ok=True)
        (recipe.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe.cfg), sort_keys=False))


def end_runtime() -> None:
    """A barrier, then the default process group destroyed if `init_runtime` created it."""
    global _OWNS_PROCESS_GROUP
    dist.barrier()
    if _OWNS_PROCESS_GROUP:
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False


def run_recipe(recipe: Any) -> list[float]:
    """Write the resolved config, train, and tear the process group down (`end_runtime`); the per-step
    losses."""
    write_config(recipe)
    losses = recipe.train()
    end_runtime()
    return losses
