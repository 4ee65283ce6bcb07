"""The reward objective: its loss pieces against closed forms and finite differences, training direction on a tiny
model, a bit-identical base, exact resume mid-rollout, bad rewards naming the problem, and the CLI's bad input.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_reward.py
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from autodeco import AutoDecoModelForCausalLM
from autodeco.cli import main
from autodeco.evaluation.benchmarks import build_prompt, load_benchmark
from autodeco.evaluation.generation import encode_prompt
from autodeco.evaluation.rewards import compute_rewards, resolve_reward
from autodeco.heads import TemperatureHead
from autodeco.losses.reward import clipped_surrogate, group_advantages, kl_penalty, policy_log_probs
from autodeco.sampling import dynamic_logits
from autodeco.testing import build_char_tokenizer, build_tiny_model, save_tiny_base
from autodeco.training import RewardTrainer, RewardTrainingArguments, head_state, train_heads_reward
from autodeco.training.reward_trainer import ROLLOUT_FILE

# ---------------------------------------------------------------------------------------------------- loss pieces


def test_log_prob_is_the_samplers_and_entropy_exact():
    torch.manual_seed(0)
    logits = torch.randn(8, 40) * 3
    t = torch.rand(8) * 1.5 + 0.3
    p = torch.rand(8) * 0.6 + 0.4
    sampler = torch.log_softmax(dynamic_logits(logits, t, p), dim=-1)  # what generate samples from
    tokens = torch.multinomial(sampler.exp(), 1).squeeze(1)
    logp, ent = policy_log_probs(logits, t, p, tokens)
    torch.testing.assert_close(logp, sampler.gather(1, tokens[:, None]).squeeze(1), rtol=0, atol=1e-5)
    q = sampler.exp()
    torch.testing.assert_close(ent, -(q * sampler.clamp_min(-1e30)).sum(-1), rtol=0, atol=1e-5)


def _enumerated_policy_gradient(t, a):
    """Two tokens, logits (a, 0), reward 1 for token 0: the exact expected policy gradient, enumerated over both
    outcomes through policy_log_probs and clipped_surrogate (ratio 1, advantage = reward), as a loss to backward."""
    logits = torch.tensor([[a, 0.0], [a, 0.0]], dtype=torch.float64)
    reward = torch.tensor([1.0, 0.0], dtype=torch.float64)
    logp, _ = policy_log_probs(logits, t.expand(2), torch.full((2,), 0.99, dtype=torch.float64), torch.tensor([0, 1]))
    prob = logp.detach().exp()  # pi(y): sigmoid(a / T), 1 - sigmoid(a / T)
    assert abs(float(prob.sum()) - 1) < 1e-12
    per_token, _ = clipped_surrogate(logp, logp.detach(), reward)  # -A * rho, rho = 1
    return (prob * per_token).sum()  # = -E[R grad log pi] in its gradient


@pytest.mark.parametrize("t0", [0.4, 1.0, 1.7])
def test_temperature_gradient_matches_finite_differences_of_expected_reward(t0):
    """E[R] = sigmoid(a / T) in closed form; its derivative in T by central differences (float64)."""
    a = 1.3
    t = torch.tensor([t0], dtype=torch.float64, requires_grad=True)
    _enumerated_policy_gradient(t, a).neg().backward()
    numeric = (1 / (1 + math.exp(-a / (t0 + 1e-6))) - 1 / (1 + math.exp(-a / (t0 - 1e-6)))) / 2e-6
    assert abs(float(t.grad) - numeric) < 1e-7 * max(1.0, abs(numeric)), (float(t.grad), numeric)
    assert abs(numeric) > 1e-2


def test_head_parameter_gradient_matches_finite_differences():
    """The same through a temperature head's parameters (the head computes in float32: a looser tolerance)."""
    a = 1.3
    head = TemperatureHead(3, 4, max_temperature=2.0)
    torch.manual_seed(1)
    for param in head.parameters():
        torch.nn.init.normal_(param, std=0.5)
    h = torch.randn(1, 3)
    _enumerated_policy_gradient(head(h).double(), a).neg().backward()
    for name, param in head.named_parameters():
        numeric = torch.zeros_like(param)
        flat = param.data.view(-1)
        for i in range(param.numel()):
            old = float(flat[i])
            values = []
            for step in (1e-3, -1e-3):
                flat[i] = old + step
                with torch.no_grad():
                    values.append(float(torch.sigmoid(a / head(h).double())))
            flat[i] = old
            numeric.view(-1)[i] = (values[0] - values[1]) / 2e-3
        torch.testing.assert_close(param.grad, numeric, rtol=2e-3, atol=2e-5)
    assert float(head.mlp[2].bias.grad.abs()) > 1e-3  # the check has something to compare


def test_top_p_gradient_is_the_soft_nucleus_gradient():
    """P's gradient is that of the relaxed objective: sum_y p~(y) R(y) d log p~(y) / dP = d E_{p~}[R] / dP."""
    logits = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    reward = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)
    alpha = 30.0

    def soft(p):  # the paper's soft nucleus, float64 reference
        prob = torch.softmax(logits, -1)
        mask = torch.exp(-alpha * torch.relu(torch.cumsum(prob, -1) - p))  # logits already sorted descending
        return prob * mask / (prob * mask).sum()

    p0 = 0.75
    top_p = torch.full((3,), p0, dtype=torch.float64, requires_grad=True)
    logp, _ = policy_log_probs(logits.expand(3, 3), torch.ones(3, dtype=torch.float64), top_p, torch.arange(3))
    weights = soft(torch.tensor(p0, dtype=torch.float64))
    (weights * reward * logp).sum().backward()
    up, down = (float((soft(torch.tensor(p0 + d, dtype=torch.float64)) * reward).sum()) for d in (1e-6, -1e-6))
    numeric = (up - down) / 2e-6
    assert abs(float(top_p.grad.sum()) - numeric) < 1e-6 * max(1, abs(numeric))
    assert abs(numeric) > 1e-3


def test_group_advantages_skip_equal_groups_and_surrogate_clips():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0] * 4, [0.0] * 4, [0.5, 0.5, 0.5, 0.5]])
    adv, keep = group_advantages(rewards)
    assert keep.tolist() == [True, False, False, False]
    assert torch.equal(adv[1:], torch.zeros(3, 4)) and torch.isfinite(adv).all()
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([[1.0, math.nan]]))
    logp = torch.log(torch.tensor([0.5, 0.5]))
    loss, clipped = clipped_surrogate(logp, torch.log(torch.tensor([0.25, 0.25])), torch.tensor([1.0, -1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 2.0]))  # rho = 2: clipped for A > 0, not for A < 0
    assert clipped.tolist() == [True, False]
    assert float(kl_penalty(logp, logp)[0]) == 0.0 and float(kl_penalty(logp, logp - 1)[0]) > 0


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "problems.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"p{i}", "problem": f"Q{i}", "gt": str(i), "kind": "exact"}) + "\n")
    return path


def peaky_model(seed=0):
    """A tiny random llama whose next-token distributions are peaked (logits x 24: top token ~0.55, the next ~0.13 and below the mean logit), so T visibly matters."""
    base = build_tiny_model(seed=seed)
    with torch.no_grad():
        base.lm_head.weight.mul_(24.0)
    return AutoDecoModelForCausalLM.from_base(base, seed=seed)


def args_for(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, group_size=8,
                    max_new_tokens=1, report_to="none", warmup_steps=0, logging_steps=1, save_steps=100,
                    learning_rate=0.05, lr_scheduler_type="constant", disable_tqdm=True)
    return RewardTrainingArguments(**{**settings, **overrides})


def next_token_ranks(model, tokenizer, problems_file):
    """{problem id: token ids sorted by the base's logit at the prompt's last position}."""
    ranks = {}
    for problem in load_benchmark(str(problems_file)).problems:
        ids = encode_prompt(tokenizer, build_prompt(problem, tokenizer))
        with torch.no_grad():
            logits = model.llm(input_ids=torch.tensor([ids])).logits[0, -1]
        ranks[problem.id] = logits.argsort(descending=True).tolist()
    return ranks


@pytest.mark.parametrize("rank, lowers", [(0, True), (1, False)])
def test_reward_for_the_argmax_lowers_t_and_for_another_token_raises_it(rank, lowers, tmp_path, tokenizer,
                                                                        problems_file):
    model = peaky_model()
    ranks = next_token_ranks(model, tokenizer, problems_file)
    base_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    summary = train_heads_reward(model, problems_file, args_for(tmp_path, max_steps=6, heads="temperature"),
                                 reward_fn=lambda problem, c: float(c.token_ids[0] == ranks[problem.id][rank]),
                                 tokenizer=tokenizer, verbose=False)
    ids = [encode_prompt(tokenizer, build_prompt(p, tokenizer)) for p in load_benchmark(str(problems_file)).problems]
    with torch.no_grad():
        t = torch.stack([model(input_ids=torch.tensor([i])).temperature[0, -1] for i in ids])
    assert bool((t < 0.97).all()) if lowers else bool((t > 1.03).all()), (t, summary)
    assert all(torch.equal(v, base_before[k]) for k, v in model.llm.state_dict().items())  # bit-identical base


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def run(tmp_path, tokenizer, problems_file, fn, *, resume=None, stop=None, **overrides):
    model = peaky_model()
    config = args_for(tmp_path, num_iterations=3, save_steps=2, kl_coef=0.1, entropy_coef=0.01, **overrides)
    problems = load_benchmark(str(problems_file)).problems
    trainer = RewardTrainer(model=model, args=config, problems=problems,
                            prompts=[build_prompt(p, tokenizer) for p in problems], reward_fn=fn,
                            processing_class=tokenizer, callbacks=[StopAt(stop)] if stop else None)
    trainer.train(resume_from_checkpoint=resume)
    return head_state(model), trainer


def test_resume_mid_rollout_is_exact(tmp_path, tokenizer, problems_file):
    def fn(problem, completion):
        return float(completion.token_ids[0] % 3 == 0)

    full, trainer = run(tmp_path / "full", tokenizer, problems_file, fn)
    assert trainer.state.global_step == 4
    # Interrupted after step 2, inside the first rollout (steps 0-2 reuse it): resume must reload its samples.
    run(tmp_path / "cut", tokenizer, problems_file, fn, stop=2)
    assert (tmp_path / "cut" / "checkpoint-2" / ROLLOUT_FILE.format(rank=0)).is_file()
    resumed, trainer = run(tmp_path / "cut", tokenizer, problems_file, fn, resume=True)
    assert trainer.state.global_step == 4
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # Negative control: without the saved rollout, step 2 resamples with other heads and the result differs.
    other, _ = run(tmp_path / "cut2", tokenizer, problems_file, fn, stop=2)
    (tmp_path / "cut2" / "checkpoint-2" / ROLLOUT_FILE.format(rank=0)).unlink()
    other, _ = run(tmp_path / "cut2", tokenizer, problems_file, fn, resume=True)
    assert not all(torch.equal(full[k], other[k]) for k in full)


def test_equal_reward_groups_are_skipped_and_counted(tmp_path, tokenizer, problems_file):
    model = peaky_model()
    before = head_state(model)
    summary = train_heads_reward(model, problems_file, args_for(tmp_path, max_steps=2), reward_fn=lambda p, c: 1,
                                 tokenizer=tokenizer, verbose=False)
    assert summary["skipped_groups_total"] == 4 and summary["skipped_groups"] == 2 and summary["groups"] == 2
    after = head_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no signal, no gradient, no move


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn, message", [
    (lambda p, c: 1 / 0, "raised ZeroDivisionError: division by zero for problem id 'p"),
    (lambda p, c: "yes", "returned 'yes' (str) for problem id 'p"),
    (lambda p, c: math.nan, "returned nan (float) for problem id 'p"),
])
def test_bad_reward_names_the_problem(fn, message, tmp_path, tokenizer, problems_file):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_heads_reward(peaky_model(), problems_file, args_for(tmp_path, max_steps=1), reward_fn=fn,
                           tokenizer=tokenizer, verbose=False)


def test_builtin_scorers_are_the_evaluations(problems_file):
    problems = load_benchmark(str(problems_file)).problems
    completions = [type("C", (), {"text": t})() for t in (r"\boxed{0}", "no", r"\boxed{2}", r"\boxed{4}")]
    assert compute_rewards(resolve_reward("auto"), problems, completions) == [1.0, 0.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("reward-cli") / "base")


def test_cli_reward_run_and_bad_input(base_dir, problems_file, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def reward(problem, completion):\n    return len(completion.text) % 2\n")
    common = ["train", "--model", str(base_dir), "--output-dir", str(tmp_path / "out"), "--report-to", "none",
              "--max-steps", "1", "--group-size", "4", "--max-new-tokens", "2", "--per-device-train-batch-size", "2"]
    assert main([*common, "--objective", "reward", "--data", str(problems_file),
                 "--reward-fn", f"{tmp_path / 'rewards.py'}:reward"]) == 0
    assert "on a reward for 1 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()

    def error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        return err

    assert "--objective 'bogus' is not one of likelihood, reward" in error(
        [*common, "--objective", "bogus", "--data", str(problems_file)])
    no_gt = tmp_path / "no_gt.jsonl"
    no_gt.write_text(json.dumps({"problem": "Q"}) + "\n")
    assert "missing required field 'gt'" in error([*common, "--objective", "reward", "--data", str(no_gt)])
    assert "does not exist" in error([*common, "--objective", "reward", "--data", str(problems_file),
                                      "--reward-fn", f"{tmp_path / 'nope.py'}:reward"])
    assert "has no attribute 'missing'" in error([*common, "--objective", "reward", "--data", str(problems_file),
                                                  "--reward-fn", f"{tmp_path / 'rewards.py'}:missing"])
    assert "--group-size applies to --objective reward only" in error([*common, "--data", str(problems_file)])


def test_two_ddp_processes_match_one(base_dir, problems_file, tmp_path):
    """accelerate launch, 2 CPU processes x 1 problem per step == 1 process x 2 problems: the same samples (seeded
    per problem), the step's token mean over both processes, so the same heads up to float summation order."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "rewards.py").write_text("def reward(problem, completion):\n"
                                         "    return float(completion.token_ids[0] % 3 == 0)\n")
    common = ["train", "--objective", "reward", "--model", str(base_dir), "--data", str(problems_file),
              "--reward-fn", f"{tmp_path / 'rewards.py'}:reward", "--max-steps", "3", "--group-size", "4",
              "--max-new-tokens", "3", "--report-to", "none", "--learning-rate", "0.01", "--warmup-steps", "0",
              "--kl-coef", "0.1", "--num-iterations", "2"]
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--per-device-train-batch-size", "2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate launch would start a single process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(repo / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(port), "-m", "autodeco.cli", *common, "--output-dir",
                           str(tmp_path / "two"), "--per-device-train-batch-size", "1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = load_file(str(tmp_path / "one" / "autodeco_heads.safetensors"))
    two = load_file(str(tmp_path / "two" / "autodeco_heads.safetensors"))
    start = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=42).heads_state_dict()
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3  # the runs trained
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-4
