"""RewardTrainer: heads-only GRPO-style policy optimisation with a verifiable reward, on AutoDecoTrainer.

    trainer = RewardTrainer(model=model, args=RewardTrainingArguments("runs/rl"), problems=problems,
                            prompts=prompts, reward_fn=fn, processing_class=tokenizer)   # engine= optional
    trainer.train()

Each optimizer step (per process): the step's micro-batches of problems come from a fixed order (each rollout's
problems repeated num_iterations times); for each problem, G completions are sampled from the current heads (the
Engine: transformers `generate` by default), seeded by (seed, rollout step, problem index); they are scored,
turned into group-normalised advantages (equal-reward groups skipped and counted), and each micro-batch's loss is
the clipped surrogate (+ KL to the starting heads, - entropy bonus) summed over tokens and divided by the step's
token count over all processes. The base runs once per micro-batch and optimisation step, computing no gradient
(frozen). The reused rollout is saved in each checkpoint, so a resumed run continues bit-exactly. docs/training.md.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers.trainer_utils import get_last_checkpoint

from autodeco.config import IGNORE_INDEX
from autodeco.evaluation.benchmarks import Problem
from autodeco.evaluation.generation import Engine, GenerationRequest, TransformersEngine, encode_prompt
from autodeco.evaluation.methods import Method
from autodeco.evaluation.rewards import RewardFn, compute_rewards
from autodeco.losses.reward import clipped_surrogate, group_advantages, kl_penalty, policy_log_probs
from autodeco.training.trainer import AutoDecoTrainer

__all__ = ["REWARD_LOGGED_METRICS", "ROLLOUT_FILE", "RewardTrainer", "problem_order", "sample_seed"]

# Keys RewardTrainer.log adds to each training log (kl only when kl_coef > 0).
REWARD_LOGGED_METRICS = ("reward_mean", "groups", "skipped_groups", "mean_temperature", "mean_top_p", "entropy",
                         "clip_fraction", "kl")
ROLLOUT_FILE = "reward_rollout-{rank}.pt"  # per process, in each checkpoint-*: the rollout being reused
AUTODECO_METHOD = Method("autodeco", "autodeco", ())  # the heads' own dynamic sampling, what `generate` does

# Window slots (one float64 tensor, one all-reduce): loss tokens, sums of T, P, entropy, KL, clipped tokens,
# samples, reward sum, groups, skipped groups.
_TOKENS, _T, _P, _ENT, _KL, _CLIP, _SAMPLES, _REWARD, _GROUPS, _SKIPPED = range(10)
_SLOTS = 10


def sample_seed(seed: int, step: int, problem_index: int) -> int:
    """The torch seed of one problem's G samples at one rollout step: a hash, so nearby triples do not collide."""
    digest = hashlib.sha256(f"autodeco-reward:{seed}:{step}:{problem_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def problem_order(num_problems: int, max_steps: int, per_step: int, num_iterations: int, seed: int) -> list[int]:
    """Problem indices in training order: per_step problems per optimizer step, each rollout's block repeated
    num_iterations times, drawn epoch by epoch from permutations seeded by (seed, epoch). [max_steps * per_step]."""
    rollouts = math.ceil(max_steps / num_iterations)
    stream: list[int] = []
    epoch = 0
    while len(stream) < rollouts * per_step:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        stream += torch.randperm(num_problems, generator=generator).tolist()
        epoch += 1
    order = []
    for r in range(rollouts):
        order += stream[r * per_step : (r + 1) * per_step] * num_iterations
    return order[: max_steps * per_step]


class _Order(Dataset):
    def __init__(self, order: list[int]):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> int:
        return self.order[i]


def _collate(indices: list[int]) -> dict:
    return {"problem_index": torch.tensor(indices, dtype=torch.long)}


class _HiddenTap:
    """Forward pre-hook on the output embedding: the last final hidden state (for the KL's reference heads)."""

    def __init__(self):
        self.value = None

    def __call__(self, module, args):
        self.value = args[0]


class RewardTrainer(AutoDecoTrainer):
    """AutoDecoTrainer whose loss is the reward objective (module docstring). `problems` and `prompts` (the
    formatted prompt of each problem, as `autodeco eval` builds it) are parallel lists; `engine` samples (default:
    TransformersEngine on the model being trained)."""

    def __init__(self, model=None, args=None, *, problems: list[Problem], prompts: list[str], reward_fn: RewardFn,
                 processing_class=None, engine: Engine | None = None, **kwargs):
        if len(problems) != len(prompts) or not problems:
            raise ValueError(f"RewardTrainer needs one prompt per problem and at least one problem; got "
                             f"{len(problems)} problems and {len(prompts)} prompts.")
        self.problems, self.prompts, self.reward_fn, self.engine = problems, prompts, reward_fn, engine
        self._prompt_ids: dict[int, list[int]] = {}
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        order = problem_order(len(problems), args.max_steps, per_step, args.num_iterations, args.seed)
        super().__init__(model=model, args=args, data_collator=_collate, train_dataset=_Order(order),
                         processing_class=processing_class, fused_loss=False, **kwargs)
        self.rollout_step: int | None = None  # the rollout step whose samples self.rollouts holds
        self.rollouts: dict[int, dict] = {}  # micro-batch position -> its sampled sequences, advantages, old logp
        self.skipped_groups_total = 0
        self._reward_window = torch.zeros(_SLOTS, dtype=torch.float64)
        self._ref_model = self._tap = self._tap_handle = None
        if args.kl_coef > 0:
            self._ref_model, self._tap, self._tap_handle = self._reference(model)

    @staticmethod
    def _reference(model):
        """A view of `model` with frozen copies of its starting heads (sharing the base and config), and a tap for
        the hidden states its forward computes: the KL's reference policy costs two tiny MLPs, not a second base."""
        ref = copy.copy(model)  # shallow: the base, the config and the hooks are shared
        ref._modules = dict(model._modules)
        for name in ("temperature_head", "top_p_head"):
            ref._modules[name] = copy.deepcopy(model._modules[name]).requires_grad_(False)
        tap = _HiddenTap()
        return ref, tap, model.get_output_embeddings().register_forward_pre_hook(tap)

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)  # order is ours

    # ------------------------------------------------------------------ rollouts

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches, each with its rollout (sampled, scored), and the step's loss-token count over
        every process (what each micro-batch's summed loss is divided by)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        rollout_step = step - step % self.args.num_iterations
        if rollout_step != self.rollout_step:
            self.rollouts, self.rollout_step = {}, rollout_step
        tokens = 0
        for j, batch in enumerate(batches):
            indices = batch["problem_index"].tolist()
            rollout = self.rollouts.get(j)
            if rollout is None or rollout["indices"] != indices:
                rollout = self.rollouts[j] = self._rollout(indices, rollout_step)
            batch["micro"] = torch.tensor(j)
            tokens += rollout["tokens"]
        total = torch.tensor(float(tokens), dtype=torch.float64, device=device)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return batches, total

    def _rollout(self, indices: list[int], rollout_step: int) -> dict:
        """Sample G completions per problem, score them, and keep the sequences of groups with a reward spread."""
        group = self.args.group_size
        model = self.accelerator.unwrap_model(self.model)
        engine = self.engine if self.engine is not None else TransformersEngine(model, self.processing_class)
        requests = [GenerationRequest(self.prompts[i], group, seed=sample_seed(self.args.seed, rollout_step, i))
                    for i in indices]
        if hasattr(engine, "update_heads"):  # an engine with its own copy of the model (vLLM): the current heads
            engine.update_heads(model.heads_state_dict())
        was_training = model.training
        model.eval()
        try:
            completions = engine.generate(requests, method=AUTODECO_METHOD, max_new_tokens=self.args.max_new_tokens,
                                          batch_size=self.args.generation_batch_size)
        finally:
            model.train(was_training)
        flat_problems = [self.problems[i] for i in indices for _ in range(group)]
        flat = [c for samples in completions for c in samples]
        rewards = torch.tensor(compute_rewards(self.reward_fn, flat_problems, flat), dtype=torch.float64)
        advantages, keep = group_advantages(rewards.view(len(indices), group))  # [n, G], [n]
        rows = []
        for g, i in enumerate(indices):
            if not keep[g]:
                continue
            if i not in self._prompt_ids:  # the same ids the engine sampled after (encode_prompt)
                self._prompt_ids[i] = encode_prompt(self.processing_class, self.prompts[i])
            prompt_ids = self._prompt_ids[i]
            for s in range(group):
                rows.append((prompt_ids, completions[g][s].token_ids, float(advantages[g, s])))
        window = self._reward_window
        window[_SAMPLES] += rewards.numel()
        window[_REWARD] += float(rewards.sum())
        window[_GROUPS] += len(indices)
        window[_SKIPPED] += int((~keep).sum())
        self.skipped_groups_total += int((~keep).sum())
        if not rows:  # nothing to learn from: one zero-weight row keeps every process's forward/backward in step
            first = completions[0][0]
            rows = [(encode_prompt(self.processing_class, self.prompts[indices[0]]), first.token_ids, None)]
        return {"indices": indices, "rows": rows, "old_logp": None,
                "tokens": sum(len(c) for _, c, a in rows if a is not None)}

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The micro-batch's share of the step's token-mean reward loss (module docstring)."""
        rollout = self.rollouts[int(inputs["micro"])]
        rows = rollout["rows"]
        device = self.args.device
        width = max(len(p) + len(c) for p, c, _ in rows)
        keep = max(len(c) for _, c, _ in rows) + 1
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [B, W] left padded (pad id masked)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        tokens = torch.full((len(rows), keep), IGNORE_INDEX, dtype=torch.long)  # [B, keep] sampled ids
        adv = torch.zeros((len(rows), keep))
        weight = torch.zeros((len(rows), keep))
        for b, (prompt, completion, a) in enumerate(rows):
            seq = list(prompt) + list(completion)
            input_ids[b, width - len(seq):] = torch.tensor(seq)
            attention_mask[b, width - len(seq):] = 1
            m = len(completion)
            # Kept index k is position W - keep + k; completion token j sits at W - m + j, predicted at W - m + j - 1.
            tokens[b, keep - m - 1 : keep - 1] = torch.tensor(completion)
            adv[b], weight[b] = (a or 0.0), (0.0 if a is None else 1.0)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        # The base's parameters are frozen, so autograd records nothing of it: only the heads build a graph.
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device), use_cache=False, logits_to_keep=keep)
        tokens = tokens.to(out.logits.device)
        sampled = tokens != IGNORE_INDEX
        config = self.accelerator.unwrap_model(model).config
        logp, ent = policy_log_probs(out.logits, out.temperature, out.top_p, tokens, alpha=config.soft_top_p_alpha)
        adv, weight = adv.to(logp.device)[sampled], weight.to(logp.device)[sampled]  # [N]
        if rollout["old_logp"] is None:  # the rollout's first optimisation step: the sampling policy is this one
            rollout["old_logp"] = logp.detach().cpu()
        per_token, clipped = clipped_surrogate(logp, rollout["old_logp"].to(logp.device), adv, self.args.clip_epsilon)
        kl = None
        if self._ref_model is not None:
            if self._tap_handle is None:
                raise RuntimeError("RewardTrainer: the KL's hidden-state hook is gone; call train() once per trainer.")
            with torch.no_grad():
                ref_t, ref_p = self._ref_model.predict_decoding(self._tap.value, out.logits)
                ref_logp, _ = policy_log_probs(out.logits, ref_t, ref_p, tokens, alpha=config.soft_top_p_alpha)
            self._tap.value = None
            kl = kl_penalty(logp, ref_logp)
            per_token = per_token + self.args.kl_coef * kl
        if self.args.entropy_coef:
            per_token = per_token - self.args.entropy_coef * ent
        total = (num_items_in_batch if num_items_in_batch is not None else weight.sum()).clamp_min(1)
        # Summed over this micro-batch, divided by the step's tokens on all processes; DDP averages gradients over
        # processes, so undo that average (as AutoDecoTrainer.compute_loss does).
        loss = (weight * per_token).sum() / total.to(logp.dtype) * self.accelerator.num_processes
        self.loss_is_scaled_for_ga = True
        with torch.no_grad():
            w = self._reward_window
            w[_TOKENS] += float(weight.sum())
            w[_T] += float((weight * out.temperature[sampled].double().to(weight.device)).sum())
            w[_P] += float((weight * out.top_p[sampled].double().to(weight.device)).sum())
            w[_ENT] += float((weight * ent).sum())
            w[_CLIP] += float((weight * clipped).sum())
            if kl is not None:
                w[_KL] += float((weight * kl).sum())
        return (loss, out) if return_outputs else loss

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the reward metrics of the logging window (every process calls this together)."""
        if "loss" in logs:
            window = self._reward_window.to(self.args.device)
            if self.args.world_size > 1:
                window = self.accelerator.reduce(window, reduction="sum")
            window = window.cpu()
            if window[_SAMPLES] > 0:
                logs["reward_mean"] = float(window[_REWARD] / window[_SAMPLES])
                logs["groups"] = int(window[_GROUPS])
                logs["skipped_groups"] = int(window[_SKIPPED])
            if window[_TOKENS] > 0:
                for slot, key in ((_T, "mean_temperature"), (_P, "mean_top_p"), (_ENT, "entropy"),
                                  (_CLIP, "clip_fraction")):
                    logs[key] = float(window[slot] / window[_TOKENS])
                if self._ref_model is not None:
                    logs["kl"] = float(window[_KL] / window[_TOKENS])
            self._reward_window = torch.zeros(_SLOTS, dtype=torch.float64)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints: the reused rollout too

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = {"rollout_step": self.rollout_step, "skipped_groups_total": self.skipped_groups_total,
                 "rollouts": {j: {**r, "rows": [list(row) for row in r["rows"]]} for j, r in self.rollouts.items()}}
        torch.save(state, os.path.join(folder, ROLLOUT_FILE.format(rank=self.args.process_index)))

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer.train; resuming also restores the rollout the checkpoint's step was reusing."""
        checkpoint = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else resume_from_checkpoint)
        if checkpoint:
            path = os.path.join(str(checkpoint), ROLLOUT_FILE.format(rank=self.args.process_index))
            if os.path.isfile(path):
                state = torch.load(path, weights_only=True)
                self.rollout_step, self.skipped_groups_total = state["rollout_step"], state["skipped_groups_total"]
                self.rollouts = {int(j): {**r, "rows": [tuple(row) for row in r["rows"]]}
                                 for j, r in state["rollouts"].items()}
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            if self._tap_handle is not None:  # the model outlives the trainer: leave no hook holding hidden states
                self._tap_handle.remove()
                self._tap_handle = None
