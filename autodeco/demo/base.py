"""The demo's tiny base model: a standard Llama config and a BPE tokenizer built locally with `tokenizers`, trained
from scratch on the demo tasks' corpus (autodeco/demo/tasks.py), imperfect on purpose.

    autodeco demo-base --output-dir runs/demo-base                     # retrain (about 30 min on 2 CPU cores)
    autodeco demo --retrain-base                                       # the same, then the whole demo on it

    from autodeco.demo.base import load_base
    model, tokenizer = load_base()                                     # the committed weights (BASE_MODEL_DIR)

The committed copy in autodeco/demo/base_model/ was written by `train_base(BASE_MODEL_DIR, BaseTrainingConfig())`;
the same config and seed on the same torch build reproduce it. Its greedy decoding is good at arithmetic but loops
on "pairs", and its T=1 sampling slips: the situation per-token decoding is meant for. Details: docs/demo.md.
"""

from __future__ import annotations

import math
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from autodeco.atomic import write_json_atomic
from autodeco.demo import tasks

__all__ = [
    "BASE_MODEL_DIR",
    "BaseTrainingConfig",
    "CHAT_TEMPLATE",
    "DEMO_TEMPLATE",
    "build_tokenizer",
    "base_config",
    "render_prompt",
    "train_base",
    "load_base",
]

BASE_MODEL_DIR = Path(__file__).with_name("base_model")
SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The evaluation's prompt template for the demo: the problem text alone (no "reason step by step" instruction: the
# tiny model was only ever trained on bare problems).
DEMO_TEMPLATE = "{problem}"
# Characters the tokenizer can always spell (merges are learned on top), so any English command tokenizes.
ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
IGNORE_INDEX = -100


@dataclass
class BaseTrainingConfig:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 150
    weight_decay: float = 0.01
    slip_rate: float = 0.1
    recheck_rate: float = 0.7
    filler_rate: float = 0.4
    vocab_size: int = 320
    tokenizer_corpus: int = 20_000  # corpus examples the BPE merges are learned on
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4


def render_prompt(user_text: str) -> str:
    """The chat-formatted prompt of one user turn (what CHAT_TEMPLATE renders with add_generation_prompt)."""
    return f"<|user|>\n{user_text}<|end|>\n<|assistant|>\n"


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer learned on `texts`: digits always single tokens (so numbers are spelled digit by digit),
    spaces kept as the "▁" marker (exact round trip), the chat special tokens, and CHAT_TEMPLATE."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),  # a token never spans two lines
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=[("▁" if c == " " else c) for c in ALPHABET])
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<|end|>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def base_config(tokenizer, cfg: BaseTrainingConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _batch(tokenizer, rng: random.Random, cfg: BaseTrainingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [batch_size, S] of fresh corpus examples, right padded; labels only on the solution."""
    pairs = [tasks.corpus_example(rng, slip_rate=cfg.slip_rate, recheck_rate=cfg.recheck_rate,
                                  filler_rate=cfg.filler_rate) for _ in range(cfg.batch_size)]
    prompts = tokenizer([render_prompt(u) for u, _ in pairs], add_special_tokens=False)["input_ids"]
    solutions = tokenizer([s for _, s in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = [(p + s + [eos], [IGNORE_INDEX] * len(p) + s + [eos]) for p, s in zip(prompts, solutions)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
    return input_ids, labels


def _learning_rate(step: int, cfg: BaseTrainingConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_base(output_dir: str | Path, cfg: BaseTrainingConfig | None = None, progress: bool = True) -> dict:
    """Build the tokenizer, train the base from scratch, and save model + tokenizer + training_info.json to
    `output_dir` (written to a temporary sibling first, then renamed into place). Returns training_info."""
    cfg = cfg or BaseTrainingConfig()
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output-dir '{output_dir}' is a file; pass a directory.")
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"autodeco-demo-base:{cfg.seed}")
    texts = []
    for _ in range(cfg.tokenizer_corpus):
        user, solution = tasks.corpus_example(rng, slip_rate=cfg.slip_rate, recheck_rate=cfg.recheck_rate,
                                              filler_rate=cfg.filler_rate)
        texts += [user, solution]
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    model = LlamaForCausalLM(base_config(tokenizer, cfg))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices; norms' gains are not decayed
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="training the demo base model", unit="step", dynamic_ncols=True)
    start, smoothed, history = time.perf_counter(), None, []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, cfg)
        input_ids, labels = _batch(tokenizer, rng, cfg)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(smoothed, 4)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    info = {"config": asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": round(smoothed, 4), "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__, "history": history}
    staging = output_dir.with_name(output_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_json_atomic(staging / "training_info.json", info)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return info


def load_base(path: str | Path = BASE_MODEL_DIR):
    """(model, tokenizer) of a demo base directory (default: the committed one), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No demo base model in '{path}' (config.json missing). Retrain it with `autodeco demo --retrain-base` "
            "or `autodeco demo-base --output-dir DIR`."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)

