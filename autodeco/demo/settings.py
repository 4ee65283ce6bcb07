"""The demo's settings: one frozen dataclass, the full run (`make demo`) and the quick one (`--quick`, the tests).

The values and what each step does with them: docs/demo.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSettings:
    train_problems: int = 1000  # problems sampled for the heads' training data (train split)
    samples_per_problem: int = 4
    max_per_problem: int = 2
    test_problems: int = 200  # held-out problems the methods are evaluated on (test split)
    heads_steps: int = 400
    heads_batch_size: int = 16
    heads_learning_rate: float = 1e-3
    control_share: float = 0.5
    control_prompts: int = 100
    probe_n: int = 1  # the headroom probe: samples per problem and seed, for each setting
    probe_seeds: int = 2
    reward_steps: int = 60  # heads trained on the verifier's reward, from the likelihood heads
    reward_problems: int = 16  # problems per step, each sampled reward_group_size times
    reward_group_size: int = 8
    reward_iterations: int = 2  # optimizer steps per sampled batch (the clipped importance ratio on the second)
    reward_learning_rate: float = 1e-2
    n: int = 4  # samples per problem and seed
    seeds: int = 3
    oracle_n: int = 1
    oracle_seeds: int = 2
    max_new_tokens: int = 128
    generation_batch_size: int = 256
    seed: int = 0


FULL = DemoSettings()
QUICK = DemoSettings(train_problems=240, test_problems=40, heads_steps=60, control_prompts=20, n=2, seeds=2,
                     oracle_n=1, oracle_seeds=1, probe_n=1, probe_seeds=1, reward_steps=4, reward_problems=8,
                     reward_group_size=4)
