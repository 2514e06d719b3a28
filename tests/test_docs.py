"""The README and docs run: every ```python block is executed, every shell command names real things.

A fenced block's info string says how its code runs (words after ``python``, invisible once rendered):

* ``python``: in this process, with no process group (as ``fsdp_frozen.estimate`` needs), in the
  repository root. A page's blocks of this kind run in order in one namespace.
* ``python ranks``: on 2 gloo ranks (`tests/dist_harness.run_ranks`), in a temporary directory both ranks
  share. A page's blocks of this kind run in order in one namespace per rank, so a block can use the
  model an earlier one sharded.
* ``setup=NAME[:ARG][,NAME...]``: before the block, the named setup (`SETUPS`) puts what the page takes
  as given into the namespace: an unsharded tiny model, a mesh, files the block reads.
* ``python no-run``: not run; counted, and allowed only where `NO_RUN` lists it (keep that tiny).

A block that raises fails its page's test with the traceback in the page's own line numbers.
``python -m tests.test_docs`` lists every block and how it runs.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .dist_harness import run_ranks

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "CONTRIBUTING.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
WORLD = 2
#: (page, first code line) of each block allowed to stay unexecuted, and why.
NO_RUN: dict[tuple[str, str], str] = {
    ("CONTRIBUTING.md", "#: DCP's `HuggingFaceStorageWriter` with consolidation (safetensors export); public from 2.8 on."):
        "an excerpt of fsdp_frozen/_torch_compat.py: its names are that module's",
}
KNOWN_WORDS = ("ranks", "no-run")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)(?P<info>.*)$")


@dataclass
class Block:
    page: str
    line: int  #: 1-based line of the block's first code line
    lang: str
    words: list[str]
    setups: list[tuple[str, str]] = field(default_factory=list)  #: (name, arg)
    code: str = ""

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def ranks(self) -> bool:
        return "ranks" in self.words

    @property
    def no_run(self) -> bool:
        return "no-run" in self.words

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of `page`, in order (indented fences in lists included)."""
    out: list[Block] = []
    lines = (ROOT / page).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        info = m["info"].split()
        block = Block(page, i + 2, info[0] if info else "", [])
        for word in info[1:]:
            if word.startswith("setup="):
                for item in word[len("setup="):].split(","):
                    name, _, arg = item.partition(":")
                    block.setups.append((name, arg))
            else:
                block.words.append(word)
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        block.code = "\n".join(body) + "\n"
        out.append(block)
        i += 1
    return out


def python_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang == "python"]


# ----------------------------------------------------------------------------------------------- setups
def tiny_llama_config():
    """A 2-layer Llama small enough for CPU tests, wide enough for NF4's default block sizes to split."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


def _setup_peft_llama(ns: dict, rank: int, world: int, arg: str) -> None:
    """`model`: an unsharded tiny transformers Llama with PEFT LoRA on q and v; `mesh`; `batches`; `torch`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(rank)
    ns.update(torch=torch, model=model, mesh=init_device_mesh("cpu", (world,)),
              batches=[torch.randint(0, 128, (2, 16), generator=gen) for _ in range(2)],
              prompts=torch.randint(0, 128, (2, 4), generator=gen))


def _setup_hf_model(ns: dict, rank: int, world: int, arg: str) -> None:
    """A tiny random transformers Llama written with save_pretrained at `arg` (relative to the block's cwd)."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    path = arg or "path/to/hf_model"
    if rank == 0 and not os.path.isdir(path):
        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    dist.barrier()
    ns.setdefault("torch", torch)


def _setup_llama_lora(ns: dict, rank: int, world: int, arg: str) -> None:
    """`model`: the in-repo Llama of `recipes/llama.py` (``layers.*``, LoRA on every linear), 4 tiny blocks;
    `mesh`; `batches` of token ids; `torch`."""
    import importlib.util

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    spec = importlib.util.spec_from_file_location("_docs_recipe_llama", ROOT / "recipes" / "llama.py")
    llama = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = llama
    spec.loader.exec_module(llama)
    torch.manual_seed(0)
    model = llama.LlamaLoRA(llama.LlamaConfig(vocab_size=64, dim=64, n_layers=4, n_heads=4, hidden_dim=128, lora_rank=4))
    gen = torch.Generator().manual_seed(rank)
    ns.update(torch=torch, model=model, mesh=init_device_mesh("cpu", (world,)),
              batches=[torch.randint(0, 64, (2, 16), generator=gen) for _ in range(2)])


def _setup_mesh(ns: dict, rank: int, world: int, arg: str) -> None:
    """`mesh`: a 1-D CPU mesh over the ranks; `torch`."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    ns.update(torch=torch, mesh=init_device_mesh("cpu", (world,)))


def _setup_lora_step(ns: dict, rank: int, world: int, arg: str) -> None:
    """`peft_llama`'s model sharded (default policy, units per decoder layer) and its AdamW `optimizer`,
    after one step."""
    from fsdp_frozen import FreezePolicy, shard_with_freezing

    _setup_peft_llama(ns, rank, world, arg)
    model = shard_with_freezing(ns["model"], ns["mesh"], FreezePolicy(units=["LlamaDecoderLayer"]))
    optimizer = ns["torch"].optim.AdamW(model.parameters(), lr=1e-3)
    ids = ns["batches"][0]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    ns.update(model=model, optimizer=optimizer)


SETUPS = {"peft_llama": _setup_peft_llama, "hf_model": _setup_hf_model, "llama_lora": _setup_llama_lora,
          "mesh": _setup_mesh, "lora_step": _setup_lora_step}


# -------------------------------------------------------------------------------------------- execution
def _execute(page: str, items: list[tuple[int, str, list[tuple[str, str]]]], rank: int, world: int) -> list[str]:
    """Run `items` ((line, code, setups)) in order in one namespace; what each block printed."""
    ns: dict = {"__name__": "docs"}
    printed = []
    for line, code, setups in items:
        for name, arg in setups:
            SETUPS[name](ns, rank, world, arg)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # padded so that a traceback shows the page's own line numbers
            exec(compile("\n" * (line - 1) + code, page, "exec"), ns)
        printed.append(out.getvalue())
    return printed


def _run_ranked(rank: int, world: int, page: str, items: list, tmp: str) -> list[str]:
    old = os.getcwd()
    os.chdir(tmp)
    try:
        return _execute(page, items, rank, world)
    finally:
        os.chdir(old)


def _items(selected: list[Block]) -> list[tuple[int, str, list[tuple[str, str]]]]:
    return [(b.line, b.code, b.setups) for b in selected]


PAGES_WITH_CODE = [p for p in PAGES if any(not b.no_run for b in python_blocks(p))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_python_blocks_run(page: str, tmp_path: Path) -> None:
    runnable = [b for b in python_blocks(page) if not b.no_run]
    for b in runnable:
        unknown = [w for w in b.words if w not in KNOWN_WORDS] + [n for n, _ in b.setups if n not in SETUPS]
        assert not unknown, f"{b.where}: unknown fence word(s) {unknown}; known: {KNOWN_WORDS}, setup={list(SETUPS)}"
        assert b.ranks or not b.setups, f"{b.where}: setups make models and meshes: mark the block 'ranks'"
    local = [b for b in runnable if not b.ranks]
    if local:
        old = os.getcwd()
        os.chdir(ROOT)
        try:
            _execute(page, _items(local), 0, 1)
        finally:
            os.chdir(old)
    ranked = [b for b in runnable if b.ranks]
    if ranked:
        run_ranks(_run_ranked, WORLD, page, _items(ranked), str(tmp_path))


def inventory() -> dict[str, dict[str, int]]:
    out = {}
    for page in PAGES:
        bs = python_blocks(page)
        out[page] = {"local": sum(not b.ranks and not b.no_run for b in bs),
                     "ranks": sum(b.ranks and not b.no_run for b in bs), "no-run": sum(b.no_run for b in bs)}
    return out


def test_block_inventory(capsys) -> None:
    """Every python block runs unless `NO_RUN` lists it; the counts are printed (``-s``)."""
    counts = inventory()
    skipped = [b for p in PAGES for b in python_blocks(p) if b.no_run]
    unlisted = [b.where for b in skipped if (b.page, b.first_line) not in NO_RUN]
    assert not unlisted, f"blocks marked no-run but not in NO_RUN: {unlisted}"
    executed = sum(c["local"] + c["ranks"] for c in counts.values())
    assert executed >= 25, f"only {executed} python blocks found: is the fence parser broken?"
    with capsys.disabled():
        print(f"\ndocs: {executed} python blocks executed "
              f"({sum(c['local'] for c in counts.values())} in-process, "
              f"{sum(c['ranks'] for c in counts.values())} on {WORLD} ranks), {len(skipped)} no-run")


# ------------------------------------------------------------------------------------------ shell blocks
PATH_PREFIXES = ("recipes/", "docs/", "scripts/", "tests/", "fsdp_frozen/")


def shell_commands(page: str) -> list[tuple[str, str]]:
    """(where, command) of each command in the page's bash blocks: continuation lines joined, comments
    and ``[optional]`` parts dropped."""
    out = []
    for b in blocks(page):
        if b.lang not in ("bash", "sh", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", b.code)
        for k, line in enumerate(joined.splitlines()):
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = re.sub(r"\[[^\]]*\]", "", line).strip()
            if line and not line.startswith("#"):
                out.append((f"{b.where}+{k}", line))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if shell_commands(p)])
def test_shell_commands_are_real(page: str) -> None:
    """Every repository path a shell command names exists, and every ``python -m fsdp_frozen`` command
    parses with the real command line (nothing is run)."""
    from fsdp_frozen.cli import build_parser

    problems = []
    for where, command in shell_commands(page):
        for part in command.split("&&"):
            try:
                argv = shlex.split(part)
            except ValueError as e:
                problems.append(f"{where}: {part!r}: {e}")
                continue
            for token in argv:
                token = token.split("=", 1)[-1]
                if token.startswith(PATH_PREFIXES) and not glob.glob(str(ROOT / token)):
                    problems.append(f"{where}: {token} does not exist")
            if argv[:3] == ["python", "-m", "fsdp_frozen"]:
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        build_parser().parse_args(argv[3:])
                except SystemExit:
                    problems.append(f"{where}: {part.strip()!r} does not parse")
    assert not problems, "\n".join(problems)


def test_policy_files_load() -> None:
    """The policy files the docs pass to ``estimate --policy`` are valid FreezePolicy YAML."""
    from fsdp_frozen import FreezePolicy

    files = sorted((ROOT / "docs" / "policies").glob("*.yaml"))
    assert files
    for f in files:
        FreezePolicy.from_yaml(f)


# ------------------------------------------------------------------------------------------ page shape
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page: str) -> None:
    """Every relative link names an existing file, and its #anchor an existing heading."""
    text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / Path(page).parent / path if path else ROOT / page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            missing.append(target)
    assert not missing, f"{page}: links to missing files or headings {missing}"


def test_readme_shape() -> None:
    """Short; the install line, the main job and the tests on the first screen; narrow tables (the torch
    table, kept as written, aside); the torch-version section present."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines"
    first = "\n".join(lines[:25])
    for command in ('pip install torch==2.13.0 && pip install -e ".[dev,hf,plot]"',
                    "torchrun --nproc-per-node 2 recipes/lora_finetune.py --config recipes/configs/lora_tiny.yaml",
                    "python -m pytest -q"):
        assert command in first, f"not on the README's first screen: {command}"
    assert "## Torch versions" in lines
    torch_section = lines.index("## Torch versions")
    end = next((i for i in range(torch_section + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    wide = [i + 1 for i, line in enumerate(lines) if line.startswith("|") and len(line) > 110
            and not torch_section < i < end]
    assert not wide, f"README.md table rows wider than 110 characters at lines {wide}"


# ------------------------------------------------------------------- generate() under every grouping
GENERATE_CASES = [("per_unit", "after_forward"), ("root", "after_forward"), ("replicate", "after_forward"),
                  ("auto", "after_forward"), ("replicate", "never")]


def _generate_every_grouping(rank: int, world: int) -> list[tuple]:
    """docs/choosing.md's RLHF loop on a tiny Llama + PEFT LoRA: ``register_forward_method(model,
    "generate")``, greedy rollouts, reference logits under ``disable_adapter()``, a policy step; against
    the same model unsharded. ("replicate", "never") leaves nothing to FSDP (the dormant root)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaForCausalLM

    from fsdp_frozen import FreezePolicy, register_forward_method, shard_with_freezing

    def build():
        torch.manual_seed(0)
        return get_peft_model(LlamaForCausalLM(tiny_llama_config()),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    prompts = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    reference = build().eval()
    with torch.no_grad():
        expected = reference.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with reference.disable_adapter():
            expected_base = reference(expected).logits
        expected_policy = reference(expected).logits
    results = []
    mesh = init_device_mesh("cpu", (world,))
    for grouping, frozen_reshard in GENERATE_CASES:
        model = shard_with_freezing(build(), mesh, FreezePolicy(units=["LlamaDecoderLayer"], frozen_reshard=frozen_reshard,
                                                                trainable_grouping=grouping))
        register_forward_method(model, "generate")
        model.eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with torch.no_grad():
            rollouts = model.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
            with model.disable_adapter():
                base = model(rollouts).logits
        logits = model(rollouts).logits
        logits.float().logsumexp(-1).mean().backward()
        with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        optimizer.step()
        with torch.no_grad():
            again = model.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
        results.append((grouping, frozen_reshard, rollouts.tolist() == expected.tolist(),
                        (base - expected_base).abs().max().item(), (logits - expected_policy).abs().max().item(),
                        all("lora_" in n for n in with_grad) and len(with_grad) == 8, again.shape == rollouts.shape))
    return results


def test_generate_under_every_grouping() -> None:
    pytest.importorskip("peft")
    for grouping, frozen_reshard, same_tokens, base_err, policy_err, grads_ok, regenerates in \
            run_ranks(_generate_every_grouping, WORLD)[0]:
        case = f"trainable_grouping={grouping!r}, frozen_reshard={frozen_reshard!r}"
        assert same_tokens, f"{case}: generate() differs from the unsharded model's"
        assert base_err < 1e-5, f"{case}: disable_adapter() logits differ from the unsharded base's by {base_err}"
        assert policy_err < 1e-5, f"{case}: adapted logits differ from the unsharded model's by {policy_err}"
        assert grads_ok, f"{case}: after the rollouts, backward did not reach exactly the 8 LoRA tensors"
        assert regenerates, f"{case}: generate() after an optimizer step failed"


if __name__ == "__main__":
    for page in PAGES:
        for b in python_blocks(page):
            kind = "no-run" if b.no_run else ("ranks" if b.ranks else "local")
            setups = ",".join(f"{n}:{a}" if a else n for n, a in b.setups)
            print(f"{b.where:28} {kind:7} {setups:24} {b.first_line[:60]}")
    for page, c in inventory().items():
        print(f"{page:28} {c}")
