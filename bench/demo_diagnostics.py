"""Why the demo's heads stay near one temperature, and why control fails on the demo base: two measurements on a
finished `autodeco demo` directory.

    .venv/bin/python bench/demo_diagnostics.py --demo-dir runs/demo [--rows 300]

1. Temperature by token kind: on the first ROWS rejection-sampled training solutions, the base's argmax accuracy
   and probability of the reference token, the temperature (on a 0.1..2.0 grid) that minimises the plain
   cross-entropy of softmax(z / T) per kind, and the mean T the trained heads (DEMO_DIR/heads) predict there.
   Kinds: the first token of a line (in `pairs`, the choice of the next pair), a digit of a result (after "="),
   other digits, everything else.
2. Is the command visible to the heads? For each row, the base's final hidden states at the completion tokens
   with a low and with a high command (autodeco.control phrasings) minus those without a command; a logistic
   probe trained on the first two thirds of the rows tells low from high, per token and per row (mean logit),
   on the last third, for seen and for held-out phrasings.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoTokenizer

from autodeco import AutoDecoModelForCausalLM
from autodeco.control import HIGH_COMMANDS, HIGH_COMMANDS_HELD_OUT, LOW_COMMANDS, LOW_COMMANDS_HELD_OUT, insert_command

T_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0)


def token_kind(tokens: list[str], i: int) -> str:
    previous = tokens[i - 1] if i else "\n"
    if previous == "\n" and tokens[i][:1].isdigit():
        return "line start"
    if tokens[i].isdigit():
        return "result digit" if "▁=" in tokens[max(0, i - 3) : i] else "other digit"
    return "other"


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids, tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def temperature_by_kind(model, tokenizer, rows: list[dict]) -> None:
    kinds: dict[str, list] = defaultdict(list)
    for row in rows:
        prompt, completion = encode(tokenizer, row["prompt"], row["completion"])
        out = model(input_ids=torch.tensor([prompt + completion]))
        family = "pairs" if "Find two" in row["prompt"] else "arith"
        tokens = tokenizer.convert_ids_to_tokens(completion)
        for i, label in enumerate(completion):
            position = len(prompt) + i - 1  # predicts completion token i
            kinds[f"{family} {token_kind(tokens, i)}"].append(
                (out.logits[0, position].float(), label, float(out.temperature[0, position])))
    print(f"{'token kind':22s} {'tokens':>7s} {'argmax acc':>10s} {'p(label)':>9s} {'CE-optimal T':>12s} {'heads T':>8s}")
    for kind, items in sorted(kinds.items()):
        logits = torch.stack([z for z, _, _ in items])
        labels = torch.tensor([y for _, y, _ in items])
        ce = {t: float(torch.nn.functional.cross_entropy(logits / t, labels)) for t in T_GRID}
        print(f"{kind:22s} {len(items):7d} {float((logits.argmax(-1) == labels).float().mean()):10.3f} "
              f"{float(torch.softmax(logits, -1).gather(1, labels[:, None]).mean()):9.3f} "
              f"{min(ce, key=ce.get):12.1f} {sum(t for _, _, t in items) / len(items):8.2f}")


@torch.no_grad()
def _hidden(model, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    prompt_ids, completion_ids = encode(tokenizer, prompt, completion)
    out = model.llm(input_ids=torch.tensor([prompt_ids + completion_ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, len(prompt_ids) - 1 : -1].float()  # [completion tokens, H]


def command_probe(model, tokenizer, rows: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    sets = {"seen": (LOW_COMMANDS, HIGH_COMMANDS), "held-out": (LOW_COMMANDS_HELD_OUT, HIGH_COMMANDS_HELD_OUT)}
    data = []  # (row, set, label 0 low / 1 high, [tokens, H] hidden difference)
    for index, row in enumerate(rows):
        plain = _hidden(model, tokenizer, row["prompt"], row["completion"])
        for name, (low, high) in sets.items():
            for label, commands in ((0, low), (1, high)):
                prompt = insert_command(row["prompt"], rng.choice(commands), tokenizer)
                data.append((index, name, label, _hidden(model, tokenizer, prompt, row["completion"]) - plain))
    split = 2 * len(rows) // 3
    train = [(label, diff) for index, name, label, diff in data if index < split and name == "seen"]
    x = torch.cat([diff for _, diff in train])
    y = torch.cat([torch.full((len(diff),), float(label)) for label, diff in train])
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(500):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for name in sets:
            test = [(label, diff @ weight + bias) for index, n, label, diff in data if index >= split and n == name]
            per_token = torch.cat([(z > 0).float() == label for label, z in test]).float().mean()
            per_row = sum(float((z.mean() > 0) == bool(label)) for label, z in test) / len(test)
            print(f"command probe, {name} phrasings, held-out rows: {float(per_token):.1%} per token, "
                  f"{per_row:.1%} per row")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="runs/demo", help="a finished `autodeco demo` output directory")
    parser.add_argument("--rows", type=int, default=300, help="training solutions to look at (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    demo = Path(args.demo_dir)
    model = AutoDecoModelForCausalLM.from_pretrained(demo / "heads").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo / "heads")
    rows = [json.loads(line) for line in (demo / "data" / "train.jsonl").open(encoding="utf-8")][: args.rows]
    temperature_by_kind(model, tokenizer, rows)
    command_probe(model, tokenizer, rows, args.seed)


if __name__ == "__main__":
    main()
