"""Official AutoDeco checkpoints (issue 12): each layout, written here from the format, loads and computes T and P as
the official code does; conversion both ways; bad input named. Tiny models only."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import autodeco  # noqa: F401  (registers the model type)
from autodeco import AutoDecoConfig, AutoDecoModelForCausalLM, losses, official
from autodeco.cli import main as cli_main
from autodeco.testing import save_tiny_base

VOCAB = 32000
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
OFFICIAL_SHAPES = lambda h: {  # noqa: E731  the official head tensors for hidden size h
    "temp_head.mlp.0.weight": (256, h), "temp_head.mlp.0.bias": (256,),
    "temp_head.mlp.2.weight": (1, 256), "temp_head.mlp.2.bias": (1,),
    "top_p_head.mlp.0.weight": (256, h + 5), "top_p_head.mlp.0.bias": (256,),
    "top_p_head.mlp.2.weight": (1, 256), "top_p_head.mlp.2.bias": (1,),
}


def official_heads(hidden: int, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heads = {k: torch.randn(shape, generator=g) * 0.3 for k, shape in OFFICIAL_SHAPES(hidden).items()}
    # Weigh the entropy feature (column h + 2 of [h, T, max, entropy, var, top5]) heavily, so that P shows which
    # entropy arithmetic was used (the official eps shifts it by ~V * 1e-8 nats).
    # Centred on log(V) (the tiny base is near uniform) so that P does not saturate.
    column = heads["top_p_head.mlp.0.weight"][:, hidden + 2].mul_(200)
    heads["top_p_head.mlp.0.bias"] -= column * math.log(VOCAB)
    return {k: v.to(dtype) for k, v in heads.items()}


def official_config(base_dir, recorded: str, old_names: bool = False) -> dict:
    """A flat AutoDecoModelForCausalLMConfig dict as the official construct script writes it."""
    raw = AutoConfig.from_pretrained(base_dir).to_dict()
    raw.update(model_type="autodeco", architectures=["AutoDecoModelForCausalLM"], base_model_type=raw["model_type"],
               base_model_name_or_path=recorded, use_enhanced_features=True,
               temperature_hidden_size=raw["hidden_size"], top_p_hidden_size=raw["hidden_size"])
    raw.update({"train_temp": True, "train_top_p": True} if old_names else
               {"enable_temperature_head": True, "enable_top_p_head": True})
    return raw


def write_official(directory, base_dir, heads, layout: str, recorded: str = "/apdcephfs/share/models/base/"):
    """Write `layout` ('heads', 'heads-old-name', 'merged', 'merged-sharded') of the official format."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(official_config(base_dir, recorded, layout == "heads-old-name")))
    if layout.startswith("heads"):
        save_file(heads, str(directory / ("model.safetensors" if layout == "heads" else "autodeco_heads.safetensors")))
        return directory
    base = {"llm." + k: v for k, v in load_file(base_dir / "model.safetensors").items()}
    if layout == "merged":
        save_file({**base, **heads}, str(directory / "model.safetensors"))
        return directory
    names = sorted(base)
    shards = {"model-00001-of-00002.safetensors": {k: base[k] for k in names[: len(names) // 2]},
              "model-00002-of-00002.safetensors": {**{k: base[k] for k in names[len(names) // 2:]}, **heads}}
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(directory / file))
        weight_map.update({k: file for k in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def reference_t_p(base, heads, ids):
    """An independent re-implementation of the official forward (model/templlm_auto.py), in float32: heads stored
    in bf16 are upcast; features of softmax(z / (T + 1e-8)) with entropy -(p * log(p + 1e-8)).sum()."""
    w = {k: v.float() for k, v in heads.items()}
    with torch.no_grad():
        out = base(input_ids=ids, output_hidden_states=True)
        h, z = out.hidden_states[-1].float(), out.logits.float()

        def mlp(prefix, x):
            x = torch.relu(x @ w[f"{prefix}.mlp.0.weight"].T + w[f"{prefix}.mlp.0.bias"])
            return torch.sigmoid(x @ w[f"{prefix}.mlp.2.weight"].T + w[f"{prefix}.mlp.2.bias"])  # [B, L, 1]

        t = mlp("temp_head", h) * 2
        p = torch.softmax(z / (t + 1e-8), dim=-1)
        stats = torch.cat([
            p.max(-1, keepdim=True).values,
            -(p * torch.log(p + 1e-8)).sum(-1, keepdim=True),
            p.var(-1, keepdim=True),
            p.topk(5, dim=-1).values.sum(-1, keepdim=True),
        ], dim=-1)
        top_p = mlp("top_p_head", torch.cat([h, t, stats], dim=-1))
    return t.squeeze(-1), top_p.squeeze(-1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # A vocabulary large enough for the official entropy's eps to show (V * 1e-8 = 3e-4 nats).
    return save_tiny_base(tmp_path_factory.mktemp("base") / "qwen2", "qwen2", seed=1, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["heads", "heads-old-name", "merged", "merged-sharded"])
def test_official_layouts_load_and_match_the_official_computation(tmp_path, base_dir, base, layout, dtype):
    heads = official_heads(64, dtype)
    directory = write_official(tmp_path / "official", base_dir, heads, layout)
    model = AutoDecoModelForCausalLM.from_pretrained(directory, base_model_name_or_path=str(base_dir))
    assert model.config.feature_arithmetic == "official"
    assert model.temperature_head.mlp[0].weight.dtype == torch.float32
    out = model(input_ids=IDS)
    ref_t, ref_p = reference_t_p(base, heads, IDS)
    assert torch.allclose(out.temperature, ref_t, atol=1e-5, rtol=0)
    assert torch.allclose(out.top_p, ref_p, atol=1e-5, rtol=0)
    # The official features matter: with ours, P is further from the official computation than the tolerance.
    model.config.feature_arithmetic = "exact"
    assert (model(input_ids=IDS).top_p - ref_p).abs().max() > 1e-4
    model.config.feature_arithmetic = "official"
    # Dynamic generation and AutoModelForCausalLM work on the loaded checkpoint.
    assert model.generate(input_ids=IDS[:1], max_new_tokens=3).shape == (1, 9)
    if layout == "heads":
        auto = AutoModelForCausalLM.from_pretrained(directory, base_model_name_or_path=str(base_dir))
        assert torch.equal(auto(input_ids=IDS).top_p, out.top_p)
    if layout.startswith("merged"):  # the override is only recorded: the base weights come from the directory
        assert model.config.base_model_name_or_path == str(base_dir)
        assert torch.equal(out.logits, base(input_ids=IDS).logits)

    # Converted to ours and back: the official key names and shapes, values bit for bit.
    ours = official.convert(directory, tmp_path / "ours", to="autodeco")
    again = AutoDecoModelForCausalLM.from_pretrained(ours, base_model_name_or_path=str(base_dir))
    assert torch.equal(again(input_ids=IDS).top_p, out.top_p)
    back = official.convert(ours, tmp_path / "back", to="official")
    raw = json.loads((back / "config.json").read_text())
    assert official.is_official_config(raw) and raw["enable_temperature_head"] and raw["base_model_type"] == "qwen2"
    files = sorted(back.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    head_keys = {k for k in tensors if not k.startswith("llm.")}
    assert head_keys == set(OFFICIAL_SHAPES(64))
    assert all(tuple(tensors[k].shape) == s and torch.equal(tensors[k], heads[k]) for k, s in OFFICIAL_SHAPES(64).items())
    if layout == "merged-sharded":
        index = json.loads((back / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["temp_head.mlp.0.weight"] == "model-00002-of-00002.safetensors"


def test_official_features_differ_from_exact_at_a_large_vocabulary():
    from autodeco.sampling import distribution_stats, scale_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 152064, generator=g) * 3  # Qwen2's vocabulary: many tiny probabilities
    t = torch.tensor([0.7, 1.3])
    ours = distribution_stats(scale_logits(logits, t))
    theirs = official.official_distribution_stats(logits, t)
    p = torch.softmax(logits.double() / (t.double()[:, None] + 1e-8), dim=-1)
    assert torch.allclose(theirs[:, 1].double(), -(p * torch.log(p + 1e-8)).sum(-1), atol=1e-4)
    assert (theirs[:, 1] - ours[:, 1]).abs().min() > 1e-4  # the eps inside the log: visible at this vocabulary
    for col in (0, 2, 3):  # max prob, variance, top-5 mass agree
        assert torch.allclose(theirs[:, col], ours[:, col], rtol=1e-4, atol=1e-9)


def test_ours_to_official_to_ours_is_bit_identical(tmp_path, base_dir):
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=3, soft_top_p_alpha=12.0)
    with torch.no_grad():
        for p in model.temperature_head.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "ours")
    model.merge(tmp_path / "ours_merged")
    for src in ("ours", "ours_merged"):
        off = official.convert(tmp_path / src, tmp_path / f"{src}_off", to="official")
        back = official.convert(off, tmp_path / f"{src}_back", to="autodeco")
        loaded = AutoDecoModelForCausalLM.from_pretrained(back)
        assert loaded.config.feature_arithmetic == "exact" and loaded.config.soft_top_p_alpha == 12.0
        assert all(torch.equal(a, b) for a, b in zip(model.heads_state_dict().values(), loaded.heads_state_dict().values()))
        ref, out = model(input_ids=IDS), loaded(input_ids=IDS)
        assert torch.equal(out.temperature, ref.temperature) and torch.equal(out.top_p, ref.top_p)
        assert torch.equal(out.logits, ref.logits)
    # The official directory itself loads too (it keeps our feature arithmetic in its `autodeco` field).
    loaded_off = AutoDecoModelForCausalLM.from_pretrained(tmp_path / "ours_off", base_model_name_or_path=str(base_dir))
    assert torch.equal(loaded_off(input_ids=IDS).top_p, model(input_ids=IDS).top_p)


def test_existing_layouts_still_load_and_merged_takes_a_base_override(tmp_path, base_dir):
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=1)
    model.save_pretrained(tmp_path / "heads")
    model.merge(tmp_path / "merged")
    ref = model(input_ids=IDS).top_p
    for d in ("heads", "merged"):
        loaded = AutoDecoModelForCausalLM.from_pretrained(tmp_path / d)
        assert loaded.config.feature_arithmetic == "exact" and torch.equal(loaded(input_ids=IDS).top_p, ref)
    merged = AutoDecoModelForCausalLM.from_pretrained(tmp_path / "merged", base_model_name_or_path=str(base_dir))
    assert merged.config.base_model_name_or_path == str(base_dir) and torch.equal(merged(input_ids=IDS).top_p, ref)


def test_official_feature_arithmetic_in_training_and_the_official_log():
    config = AutoDecoConfig(hidden_size=8, feature_arithmetic="official")
    assert config.feature_arithmetic == "official"
    with pytest.raises(ValueError, match="feature_arithmetic"):
        AutoDecoConfig(hidden_size=8, feature_arithmetic="paper")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 4
    labels = torch.randint(0, 50, (2, 5), generator=g)
    t = torch.rand(2, 5, generator=g).add(0.5).requires_grad_()
    p = torch.rand(2, 5, generator=g).mul(0.9).add(0.05).requires_grad_()
    for official_log in (False, True):
        fast = losses.soft_top_p_loss(logits, t, p, labels, official_log=official_log)
        ref = losses._soft_top_p_loss_reference(logits, t, p, labels, official_log=official_log)
        assert torch.allclose(fast, ref, atol=1e-5)
        g_fast = torch.autograd.grad(fast, (t, p))
        g_ref = torch.autograd.grad(ref, (t, p))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_fast, g_ref))
    # A label far outside the nucleus: the official log saturates at -log(1e-9) ~ 20.7, the exact one does not.
    far = torch.full((1, 1), 0)
    z = torch.tensor([[[0.0] + [30.0] * 9]])
    one = torch.ones(1, 1)
    exact = losses.soft_top_p_loss(z, one, one * 0.1, far, dft=False)
    off = losses.soft_top_p_loss(z, one, one * 0.1, far, dft=False, official_log=True)
    assert exact > 25 and abs(float(off) - 20.72) < 0.01


def test_model_training_uses_the_recorded_arithmetic(tmp_path, base_dir, base):
    heads = official_heads(64, torch.float32)
    directory = write_official(tmp_path / "off", base_dir, heads, "heads")
    model = AutoDecoModelForCausalLM.from_pretrained(directory, base_model_name_or_path=str(base_dir))
    model.config.soft_top_p_official_log = True
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert model.top_p_head.mlp[0].weight.grad is not None
    _, ref_p = reference_t_p(base, heads, IDS)
    assert torch.allclose(out.top_p, ref_p, atol=1e-5, rtol=0)  # training forward: official features too


def test_bad_input_names_the_problem(tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"found \['notes.txt'\].*Expected an AutoDeco directory"):
        AutoDecoModelForCausalLM.from_pretrained(tmp_path / "empty")
    no_weights = write_official(tmp_path / "nw", base_dir, official_heads(64, torch.float32), "heads")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights: found \['config.json'\].*Expected"):
        AutoDecoModelForCausalLM.from_pretrained(no_weights)
    # Heads of a bigger base (hidden 96) on this one (hidden 64): both sizes named.
    big = write_official(tmp_path / "big", base_dir, official_heads(96, torch.bfloat16), "heads")
    with pytest.raises(ValueError, match=r"hidden size 96.*\(256, 96\).*hidden size 64"):
        AutoDecoModelForCausalLM.from_pretrained(big, base_model_name_or_path=str(base_dir))
    # The recorded base is a path on the authors' cluster.
    lost = write_official(tmp_path / "lost", base_dir, official_heads(64, torch.float32), "heads")
    with pytest.raises(FileNotFoundError, match=r"/apdcephfs/share/models/base/.*does not exist.*pass base_model_name_or_path"):
        AutoDecoModelForCausalLM.from_pretrained(lost)
    with pytest.raises(FileExistsError, match="not empty"):
        official.convert(lost, tmp_path / "empty", to="autodeco")
    with pytest.raises(ValueError, match="already in the official format"):
        official.convert(lost, tmp_path / "x", to="official")
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), max_temperature=1.5)
    model.save_pretrained(tmp_path / "t15")
    with pytest.raises(ValueError, match="max_temperature=1.5"):
        official.convert(tmp_path / "t15", tmp_path / "t15_off", to="official")


def test_cli_convert(tmp_path, base_dir, capsys):
    directory = write_official(tmp_path / "off", base_dir, official_heads(64, torch.bfloat16), "heads")
    assert cli_main(["convert", "--to", "autodeco", "--model", str(directory), "--output-dir", str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "autodeco_heads.safetensors").exists()
    assert cli_main(["convert", "--to", "official", "--model", str(tmp_path / "ours"), "--output-dir", str(tmp_path / "ours")]) == 2
    assert "not empty" in capsys.readouterr().err
