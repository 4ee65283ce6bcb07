"""AutoDecoModelForCausalLM: wrapping, forward, dynamic generate as a drop-in, save/load, merge/split, bad input."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline
from transformers.generation.streamers import BaseStreamer

import autodeco
from autodeco import AutoDecoModelForCausalLM
from autodeco.modeling import HEADS_WEIGHTS_NAME
from autodeco.testing import TINY_ARCHITECTURES, build_char_tokenizer, build_tiny_model, save_tiny_base


def force_constant_heads(model: AutoDecoModelForCausalLM, temperature: float, top_p: float) -> tuple[float, float]:
    """Make the heads output constants; returns the exact float32 values they produce."""
    with torch.no_grad():
        for head, value in ((model.temperature_head, temperature / model.config.max_temperature), (model.top_p_head, top_p)):
            head.mlp[2].weight.zero_()
            head.mlp[2].bias.fill_(math.log(value / (1 - value)))
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    return float(out.temperature[0, 0].detach()), float(out.top_p[0, 0].detach())


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_char_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture()
def base():
    return build_tiny_model("llama", seed=0)


def test_wrapping_never_changes_base_logits(base):
    ids = torch.randint(4, 100, (2, 9))
    expected = base(input_ids=ids).logits
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = AutoDecoModelForCausalLM.from_base(base)
    out = model(input_ids=ids)
    assert torch.equal(out.logits, expected)
    assert out.temperature.shape == out.top_p.shape == (2, 9)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(p.requires_grad for p in model.llm.parameters())
    kept = model(input_ids=ids, logits_to_keep=1)
    assert kept.logits.shape == (2, 1, 100) and kept.temperature.shape == (2, 1)
    torch.testing.assert_close(kept.temperature[:, 0], out.temperature[:, -1])


def test_fresh_heads_start_at_t1_and_are_seeded(base):
    model = AutoDecoModelForCausalLM.from_base(base, seed=3)
    out = model(input_ids=torch.tensor([[4, 5, 6]]))
    torch.testing.assert_close(out.temperature, torch.ones_like(out.temperature))
    torch.testing.assert_close(out.top_p, torch.full_like(out.top_p, 0.95))
    other = AutoDecoModelForCausalLM.from_base(build_tiny_model("llama"), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.heads_state_dict().values(), other.heads_state_dict().values()))


@pytest.mark.parametrize("t,p", [(0.7, 0.9), (1.3, 0.5), (0.4, 0.999)])
def test_constant_heads_generate_equals_static_sampling(base, t, p):
    model = AutoDecoModelForCausalLM.from_base(base)
    t32, p32 = force_constant_heads(model, t, p)
    ids = torch.randint(4, 100, (3, 6))
    torch.manual_seed(1234)
    ours = model.generate(ids, max_new_tokens=24, return_dict_in_generate=True)
    torch.manual_seed(1234)
    ref = base.generate(ids, do_sample=True, temperature=t32, top_p=p32, top_k=0, max_new_tokens=24)
    assert torch.equal(ours.sequences, ref)
    finite = torch.isfinite(ours.temperatures)
    assert torch.allclose(ours.temperatures[finite], torch.tensor(t32))
    assert torch.allclose(ours.top_ps[finite], torch.tensor(p32))


def test_dynamic_actually_changes_sampling(base):
    # Guards the equivalence test above: a different T must give different samples.
    model = AutoDecoModelForCausalLM.from_base(base)
    force_constant_heads(model, 0.3, 0.9)
    ids = torch.randint(4, 100, (3, 6))
    torch.manual_seed(0)
    ours = model.generate(ids, max_new_tokens=24)
    torch.manual_seed(0)
    plain = base.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=24)
    assert not torch.equal(ours, plain)


def test_greedy_is_base_greedy(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    force_constant_heads(model, 1.7, 0.3)
    ids = torch.randint(4, 100, (2, 5))
    ours = model.generate(ids, do_sample=False, max_new_tokens=20, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, base.generate(ids, do_sample=False, max_new_tokens=20))
    assert ours.temperatures.shape == (2, 20)


def test_static_kwargs_bypass_heads(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    force_constant_heads(model, 0.2, 0.2)  # would be near-greedy if the heads were (wrongly) applied
    ids = torch.randint(4, 100, (2, 5))
    torch.manual_seed(7)
    ours = model.generate(ids, temperature=1.4, top_p=0.97, max_new_tokens=16, return_dict_in_generate=True)
    torch.manual_seed(7)
    ref = base.generate(ids, do_sample=True, temperature=1.4, top_p=0.97, top_k=0, max_new_tokens=16)
    assert torch.equal(ours.sequences, ref)
    assert torch.all(ours.temperatures[torch.isfinite(ours.temperatures)] == 1.4)


@pytest.mark.parametrize("kwargs,match", [({"temperature": 0.0}, "do_sample=False"), ({"temperature": -1.0}, "temperature"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.2}, "top_p")])
def test_generate_rejects_bad_static_values(base, kwargs, match):
    model = AutoDecoModelForCausalLM.from_base(base)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=2, **kwargs)


def test_non_finite_heads_never_reach_the_sampler(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    with torch.no_grad():
        model.top_p_head.mlp[2].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.generate(torch.tensor([[4, 5]]), max_new_tokens=2)


def test_batched_left_padding_num_return_sequences_and_traces(base, tokenizer):
    model = AutoDecoModelForCausalLM.from_base(base)
    batch = tokenizer(["hi", "a longer prompt"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=10, num_return_sequences=3, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 6
    assert out.temperatures.shape == out.top_ps.shape == (6, out.sequences.shape[1] - batch.input_ids.shape[1])
    # Greedy on a padded batch equals the base's greedy on the same batch.
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=10)
    assert torch.equal(greedy, base.generate(**batch, do_sample=False, max_new_tokens=10))


def test_traces_follow_the_heads_and_nan_after_eos(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    # Make T depend on the hidden state so the trace is not constant.
    with torch.no_grad():
        model.temperature_head.mlp[2].weight.normal_(0, 0.5)
    ids = torch.randint(4, 100, (2, 4))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=12, return_dict_in_generate=True)
    gen = out.sequences[:, 4:]
    for step in range(gen.shape[1]):
        seq = out.sequences[:, : 4 + step]
        if torch.isfinite(out.temperatures[:, step]).all():
            expected = model(input_ids=seq).temperature[:, -1]
            torch.testing.assert_close(out.temperatures[:, step], expected, rtol=1e-4, atol=1e-5)


def test_eos_padding_positions_are_nan(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    ids = torch.tensor([[4, 5, 6], [7, 8, 9], [10, 11, 12]])
    greedy = model.generate(ids, do_sample=False, max_new_tokens=8)
    eos = int(greedy[0, 4])  # row 0's second greedy token, declared EOS: row 0 finishes early
    out = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                         return_dict_in_generate=True)
    generated = out.sequences[:, 3:]
    finished_early = 0
    for row in range(3):
        hits = (generated[row] == eos).nonzero().flatten()
        end = int(hits[0]) + 1 if hits.numel() else generated.shape[1]
        assert torch.isfinite(out.temperatures[row, :end]).all()
        assert torch.isnan(out.temperatures[row, end:]).all() and torch.isnan(out.top_ps[row, end:]).all()
        finished_early += end < generated.shape[1]
    assert finished_early >= 1


def test_streamer_and_pipeline(base, tokenizer):
    model = AutoDecoModelForCausalLM.from_base(base)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            pass

    streamer = Collect()
    ids = tokenizer("abc", return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=8, streamer=streamer)
    assert torch.equal(torch.cat(streamer.chunks), out[0])

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("hello", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("hello") and len(text) > len("hello")


def test_bf16_base_keeps_float32_heads(tokenizer):
    base = build_tiny_model("llama", dtype=torch.bfloat16)
    model = AutoDecoModelForCausalLM.from_base(base)
    assert model.temperature_head.mlp[0].weight.dtype == torch.float32
    out = model(input_ids=torch.tensor([[4, 5, 6]]))
    assert out.logits.dtype == torch.bfloat16 and out.temperature.dtype == torch.float32
    gen = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=6, return_dict_in_generate=True)
    assert torch.isfinite(gen.temperatures).all() and gen.temperatures.dtype == torch.float32


def test_save_load_roundtrip_is_bit_exact_and_heads_only(tmp_path):
    base_dir = save_tiny_base(tmp_path / "base")
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=11)
    with torch.no_grad():
        model.top_p_head.mlp[2].weight.normal_()
    model.save_pretrained(tmp_path / "heads")
    files = sorted(os.listdir(tmp_path / "heads"))
    assert files == sorted(["config.json", "generation_config.json", HEADS_WEIGHTS_NAME])
    saved = load_file(tmp_path / "heads" / HEADS_WEIGHTS_NAME)
    assert all(k.startswith(("temperature_head.", "top_p_head.")) for k in saved)
    heads_bytes = (tmp_path / "heads" / HEADS_WEIGHTS_NAME).stat().st_size
    base_bytes = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    print(f"heads-only file: {heads_bytes} bytes; base weights: {base_bytes} bytes")
    assert heads_bytes < base_bytes

    loaded = AutoDecoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert loaded.name_or_path == str(tmp_path / "heads")
    assert loaded.config.base_model_name_or_path == str(base_dir.resolve())
    for (k, a), (_, b) in zip(model.heads_state_dict().items(), loaded.heads_state_dict().items()):
        assert torch.equal(a, b), k
    via_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert isinstance(via_auto, AutoDecoModelForCausalLM)
    ids = torch.tensor([[4, 5, 6, 7]])
    ref = model(input_ids=ids)
    for other in (loaded, via_auto):
        out = other(input_ids=ids)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.top_p, ref.top_p)


def test_merge_and_split_roundtrip(tmp_path):
    base_dir = save_tiny_base(tmp_path / "base", tie_word_embeddings=True)
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=5)
    with torch.no_grad():
        model.temperature_head.mlp[2].weight.normal_()
    model.save_pretrained(tmp_path / "heads")
    model.merge(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / HEADS_WEIGHTS_NAME).exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert isinstance(merged, AutoDecoModelForCausalLM)
    ids = torch.tensor([[4, 5, 6, 7]])
    ref = model(input_ids=ids)
    out = merged(input_ids=ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.temperature, ref.temperature)
    assert merged.llm.lm_head.weight.data_ptr() == merged.llm.model.embed_tokens.weight.data_ptr()  # still tied

    merged.split(tmp_path / "split", base_output_dir=tmp_path / "split_base")
    again = AutoDecoModelForCausalLM.from_pretrained(tmp_path / "split")
    assert all(torch.equal(a, b) for a, b in zip(model.heads_state_dict().values(), again.heads_state_dict().values()))
    assert torch.equal(again(input_ids=ids).logits, ref.logits)
    with pytest.raises(FileExistsError, match="not empty"):
        model.merge(tmp_path / "merged")
    with pytest.raises(ValueError, match="merged model"):
        model.save_pretrained(tmp_path / "merged")


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_architectures(arch, tmp_path, tokenizer):
    base = build_tiny_model(arch)
    model = AutoDecoModelForCausalLM.from_base(base)
    ids = tokenizer(["hello there", "hi"], return_tensors="pt", padding=True)
    assert torch.equal(model(**ids).logits, base(**ids).logits)
    out = model.generate(**ids, max_new_tokens=6, return_dict_in_generate=True)
    assert out.temperatures.shape == (2, out.sequences.shape[1] - ids.input_ids.shape[1])
    assert torch.equal(model.generate(**ids, do_sample=False, max_new_tokens=6), base.generate(**ids, do_sample=False, max_new_tokens=6))
    base.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "heads")
    loaded = AutoDecoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert torch.equal(loaded(**ids).top_p, model(**ids).top_p)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoDecoModelForCausalLM.from_base(str(tmp_path / "no_such_base"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoDecoModelForCausalLM.from_pretrained(str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="Unknown AutoDecoConfig field"):
        AutoDecoModelForCausalLM.from_base(build_tiny_model(), max_temprature=1.0)

    base_dir = save_tiny_base(tmp_path / "base")
    model = AutoDecoModelForCausalLM.from_base(str(base_dir))
    model.save_pretrained(tmp_path / "heads")
    # Heads built for another hidden size: both sizes are named.
    other = AutoDecoModelForCausalLM.from_base(build_tiny_model("gpt2"))
    other.config.hidden_size = 48
    with pytest.raises(ValueError, match=r"hidden size 48.*hidden size 64"):
        AutoDecoModelForCausalLM(other.config, base_model=build_tiny_model("llama"))

    heads_file = tmp_path / "heads" / HEADS_WEIGHTS_NAME
    tensors = load_file(heads_file)
    tensors.pop("top_p_head.mlp.2.bias")
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, heads_file)
    with pytest.raises(ValueError, match=r"missing (head )?tensors \['top_p_head.mlp.2.bias'\].*unexpected tensors \['extra.weight'\]"):
        AutoDecoModelForCausalLM.from_pretrained(tmp_path / "heads")

    tensors = load_file(tmp_path / "heads" / HEADS_WEIGHTS_NAME)
    tensors["top_p_head.mlp.2.bias"] = torch.zeros(1)
    tensors.pop("extra.weight")
    tensors["temperature_head.mlp.0.weight"] = torch.zeros(256, 32)
    save_file(tensors, heads_file)
    with pytest.raises(ValueError, match="temperature_head.mlp.0.weight.*shape"):
        AutoDecoModelForCausalLM.from_pretrained(tmp_path / "heads")

    (tmp_path / "heads" / HEADS_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=HEADS_WEIGHTS_NAME):
        AutoDecoModelForCausalLM.from_pretrained(tmp_path / "heads")

    with pytest.raises(ValueError, match="not an AutoDeco"):
        AutoDecoModelForCausalLM.from_pretrained(base_dir)


def test_only_safetensors_written(tmp_path):
    model = AutoDecoModelForCausalLM.from_base(str(save_tiny_base(tmp_path / "base")))
    model.save_pretrained(tmp_path / "heads")
    model.merge(tmp_path / "merged")
    for directory in ("heads", "merged"):
        suffixes = {p.suffix for p in (tmp_path / directory).iterdir()}
        assert suffixes <= {".json", ".safetensors"}, suffixes


def test_public_api_names():
    assert autodeco.AutoDecoConfig.model_type == "autodeco"
    config = autodeco.AutoDecoConfig()
    for field, default in dict(head_hidden_size=256, max_temperature=2.0, top_p_features=True, train_temperature=True,
                               train_top_p=True, soft_top_p_alpha=30.0, easy_token_mask_ratio=0.6, dft=True).items():
        assert getattr(config, field) == default, field
    assert config.base_model_name_or_path is None


def test_train_mode_keeps_base_in_eval_and_heads_float32_under_autocast(base):
    model = AutoDecoModelForCausalLM.from_base(base)
    model.train()
    assert model.temperature_head.training and not model.llm.training
    assert not any(m.training for m in model.llm.modules())
    with torch.no_grad():
        model.temperature_head.mlp[2].weight.normal_()
    ids = torch.tensor([[4, 5, 6, 7]])
    plain = model(input_ids=ids)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        auto = model(input_ids=ids)
    assert auto.temperature.dtype == torch.float32
    # Same inputs inside and outside autocast give bit-identical heads: nothing ran in bf16.
    hidden, logits = torch.randn(1, 4, 64), torch.randn(1, 4, 100)
    outside = model.predict_decoding(hidden, logits)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = model.predict_decoding(hidden, logits)
    assert torch.equal(outside[0], inside[0]) and torch.equal(outside[1], inside[1])
    assert plain.temperature.dtype == torch.float32


@pytest.mark.parametrize("which", ["temperature", "top_p"])
def test_single_head_ablations_equal_static_sampling(base, which):
    with torch.no_grad():  # peaked logits, so that sampling at T = 0.6 and at T = 1 really differ
        base.lm_head.weight.mul_(25)
    model = AutoDecoModelForCausalLM.from_base(base)
    t32, p32 = force_constant_heads(model, 0.6, 0.7)
    ids = torch.randint(4, 100, (2, 5))
    torch.manual_seed(99)
    if which == "temperature":  # heads' T, P = 1
        ours = model.generate(ids, max_new_tokens=16, use_top_p_head=False, return_dict_in_generate=True)
        static = dict(temperature=t32, top_p=1.0)
    else:  # T = 1, heads' P
        ours = model.generate(ids, max_new_tokens=16, use_temperature_head=False, return_dict_in_generate=True)
        static = dict(temperature=1.0, top_p=p32)
    torch.manual_seed(99)
    ref = base.generate(ids, do_sample=True, top_k=0, max_new_tokens=16, **static)
    assert torch.equal(ours.sequences, ref)
    finite = torch.isfinite(ours.temperatures)
    assert torch.all(ours.temperatures[finite] == static["temperature"]) and torch.all(ours.top_ps[finite] == static["top_p"])
    with pytest.raises(ValueError, match="static"):
        model.generate(ids, max_new_tokens=2, temperature=0.5, use_top_p_head=False)


def test_teacher_forced_matches_an_unpadded_forward_per_row(base):
    from autodeco.modeling import teacher_forced

    model = AutoDecoModelForCausalLM.from_base(base, seed=3)
    with torch.no_grad():  # heads that vary from token to token
        model.temperature_head.mlp[2].weight.normal_(0, 0.5)
        model.top_p_head.mlp[2].weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(0)
    rows = [
        (torch.randint(4, 90, (n,), generator=gen).tolist(), torch.randint(4, 90, (m,), generator=gen).tolist())
        for n, m in ((5, 3), (2, 7), (9, 1), (4, 4), (1, 2))
    ]
    calls = []
    results = teacher_forced(model, rows, batch_size=2, logits=True, on_batch=calls.append)
    assert sum(calls) == len(rows) and len(calls) == 3
    for (prompt, completion), r in zip(rows, results):
        out = model(input_ids=torch.tensor([prompt + completion]))
        m = len(completion)
        positions = slice(len(prompt) - 1, len(prompt) + m - 1)  # position i predicts token i + 1
        assert r.temperature.shape == r.top_p.shape == (m,) and r.logits.shape == (m, base.config.vocab_size)
        torch.testing.assert_close(r.temperature, out.temperature[0, positions], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.top_p, out.top_p[0, positions], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.logits, out.logits[0, positions], rtol=1e-4, atol=1e-5)
    single = teacher_forced(model, rows[:1], batch_size=1)[0]
    assert single.logits is None and single.temperature.device.type == "cpu"
    torch.testing.assert_close(single.temperature, results[0].temperature, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="empty completion"):
        teacher_forced(model, [([1, 2], [])])


def test_check_model_source_is_the_one_path_or_hub_rule(tmp_path):
    from autodeco.modeling import check_model_source, looks_like_hub_id

    assert check_model_source(str(tmp_path)) == "local"
    assert check_model_source("Qwen/Qwen2.5-0.5B") == "hub"
    assert looks_like_hub_id("owner/name") and not looks_like_hub_id("./owner/name")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("gpt2") and not looks_like_hub_id("a/")
    (tmp_path / "file").write_text("x")
    assert check_model_source(str(tmp_path / "file")) == "local"
    # A file where a directory is wanted is named as a file (issue 15), not "does not exist".
    with pytest.raises(ValueError, match="AutoDeco model directory '.*file' is a file, not a directory. Create"):
        check_model_source(str(tmp_path / "file"), "AutoDeco model directory", fix="Create one.", directory=True)
    with pytest.raises(FileNotFoundError, match="The base model path '.*nope' does not exist. Pass an existing"):
        check_model_source(str(tmp_path / "nope"))


def test_forward_with_labels_returns_the_two_head_losses(base):
    from autodeco.losses import soft_top_p_loss, temperature_loss

    model = AutoDecoModelForCausalLM.from_base(base, seed=0)
    ids = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    torch.manual_seed(0)
    out = model(input_ids=ids, labels=labels)
    torch.manual_seed(0)
    t = temperature_loss(out.logits[:, :-1], out.temperature[:, :-1], labels[:, 1:])
    p = soft_top_p_loss(out.logits[:, :-1], out.temperature[:, :-1], out.top_p[:, :-1], labels[:, 1:])
    assert torch.equal(out.temperature_loss, t) and torch.equal(out.top_p_loss, p)
    assert torch.equal(out.loss, t + p)
