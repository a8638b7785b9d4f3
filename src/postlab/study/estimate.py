"""Cost estimates for `postlab study plan`: tokens per run from the tokenizer on a data sample, time
from a throughput measured here (`--measure`) or a documented default per device. Estimates only."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config import ModelConfig, RunConfig, StageConfig
from ..errors import PostlabError

log = logging.getLogger("postlab")


class PlannedRun(Protocol):
    """What an estimate needs of a planned run (postlab.study.PlannedRun has it)."""

    run_id: str
    config: RunConfig

# Throughput defaults, for a ~135M-parameter model (SmolLM2-135M) with this training loop: full
# fine-tuning steps of 8x128 tokens as measure_throughput times them, on 2 cores (medians of 3).
# cpu-bf16-amx: Intel Xeon with AMX, postlab 0.1.3 (~625 tokens/s; decode step 0.045 s).
# cpu-bf16: AMD EPYC with AVX-512 BF16 and no AMX, an earlier release (~230 tokens/s).
# cpu-fp32: a 2-core AMD EPYC with AVX2 only, postlab 0.1.5 (~123 tokens/s; decode step 0.159 s;
# `make demo` there took 14.6 min; these figures estimate 15). The Intel Xeon limited to AVX2
# (ATEN_CPU_CAPABILITY=avx2 etc.) gave 240 and 0.076 s at 0.1.3: same ISA, twice as fast a machine.
# cuda: a rough figure for one recent data-center GPU at the small batches used here (~1-2k
# tokens a step, so per-step overhead dominates); measure with --measure.
DEFAULT_TOKENS_PER_S = {"cpu-bf16-amx": 625.0, "cpu-bf16": 230.0, "cpu-fp32": 123.0, "cuda": 20000.0}
# One decode step (one new token for a batch of prompts) with the KV cache.
DEFAULT_DECODE_STEP_S = {"cpu-bf16-amx": 0.045, "cpu-bf16": 0.06, "cpu-fp32": 0.159, "cuda": 0.03}
DEFAULT_MEASURED_ON = {"cpu-bf16-amx": "a 2-core Intel Xeon with AMX",
                       "cpu-bf16": "a 2-core AMD EPYC with AVX-512 BF16",
                       "cpu-fp32": "a 2-core AMD EPYC with AVX2 only"}
FORWARD_COST = 1 / 3  # a forward-only token vs a training (forward+backward) token
STAGE_OVERHEAD_S = {"cpu": 8.0, "cuda": 4.0}  # model load/save per stage
TOKENIZER_SAMPLE = 200  # examples tokenized per data set for the token estimate


@dataclass
class DataStats:
    n: int
    prompt_tokens: float  # mean per example
    completion_tokens: float  # mean per example (with EOS where the task appends it)
    single_token: bool  # every sampled completion is one token (answers share one row)


@dataclass
class Throughput:
    tokens_per_s: float
    decode_step_s: float
    source: str  # how it was obtained


@dataclass
class StageEstimate:
    name: str
    examples: int | None
    epochs: float
    train_tokens: float | None
    seconds: float | None
    reused: bool = False  # identical to a stage of an earlier run: copied, not trained
    extrapolated: bool = False  # an ExPO stage whose training an earlier run did: extrapolated and evaluated only


@dataclass
class RunEstimate:
    run: PlannedRun
    stages: list[StageEstimate]

    @property
    def train_tokens(self) -> float | None:
        t = [s.train_tokens for s in self.stages]
        return None if any(x is None for x in t) else sum(t)

    @property
    def seconds(self) -> float | None:
        t = [s.seconds for s in self.stages]
        return None if any(x is None for x in t) else sum(t)


class _Tokens:
    """Token counts: the model's tokenizer when it loads locally, else characters / 4."""

    def __init__(self):
        self._tok: dict[str, Any] = {}
        self.methods: set[str] = set()

    def tokenizer(self, model: str):
        """The model's fast tokenizer (tokenizer.json, read by the `tokenizers` library: no torch), where
        it is on disk: a local model directory, or the embedded model once unpacked; else None."""
        if model not in self._tok:
            self._tok[model] = None
            from ..cache import postlab_home

            dirs = [Path(model).expanduser(), postlab_home() / "models" / model, postlab_home() / "tokenizers" / model]
            found = next((d / "tokenizer.json" for d in dirs if (d / "tokenizer.json").is_file()), None)
            try:
                if found is not None:
                    from tokenizers import Tokenizer

                    self._tok[model] = Tokenizer.from_file(str(found))
            except Exception as e:  # noqa: BLE001 - an estimate falls back, never fails
                log.debug("no tokenizer for %s (%s); estimating tokens as characters / 4", model, e)
        return self._tok[model]

    def stats(self, examples: list, model: str, eos: bool) -> DataStats:
        if not examples:
            return DataStats(0, 0.0, 0.0, False)
        step = max(1, len(examples) // TOKENIZER_SAMPLE)
        sample = examples[::step][:TOKENIZER_SAMPLE]
        tok = self.tokenizer(model)
        if tok is not None:
            self.methods.add("tokenizer")
            p = [len(tok.encode(ex.prompt, add_special_tokens=False).ids) for ex in sample]
            c = [len(tok.encode(ex.completion, add_special_tokens=False).ids) for ex in sample]
        else:
            self.methods.add("chars/4")
            p = [max(1, round(len(ex.prompt) / 4)) for ex in sample]
            c = [max(1, round(len(ex.completion) / 4)) for ex in sample]
        single = not eos and all(x <= 1 for x in c)
        return DataStats(len(examples), sum(p) / len(p), sum(c) / len(c) + (1 if eos else 0), single)


def _device_type(m: ModelConfig) -> str:
    if m.device == "auto":
        from ..hardware import cuda_present

        return "cuda" if cuda_present() else "cpu"
    return "cuda" if m.device.startswith("cuda") else "cpu"


def default_throughput(m: ModelConfig) -> Throughput:
    dev = _device_type(m)
    if dev == "cuda":
        return Throughput(DEFAULT_TOKENS_PER_S["cuda"], DEFAULT_DECODE_STEP_S["cuda"],
                          f"default for ~135M-parameter models on cuda: {DEFAULT_TOKENS_PER_S['cuda']:.0f} "
                          f"tokens/s (rough)")
    from ..hardware import cpu_flags, cpu_has_fast_bf16

    prec = m.precision if m.precision != "auto" else ("bf16" if cpu_has_fast_bf16() else "fp32")
    key = ("cpu-bf16-amx" if "amx_bf16" in cpu_flags() else "cpu-bf16") if prec == "bf16" else "cpu-fp32"
    caveat = "; this CPU has no native bf16, so bf16 runs far slower (measure with --measure)" \
        if prec == "bf16" and not cpu_has_fast_bf16() else ""
    return Throughput(DEFAULT_TOKENS_PER_S[key], DEFAULT_DECODE_STEP_S[key],
                      f"default for ~135M-parameter models on cpu in {prec} (measured on "
                      f"{DEFAULT_MEASURED_ON[key]}): {DEFAULT_TOKENS_PER_S[key]:.0f} tokens/s{caveat}")


def measure_throughput(m: ModelConfig, seq_len: int = 128, batch_size: int = 8, steps: int = 2,
                       decode_steps: int = 8) -> Throughput:
    """Time `steps` full fine-tuning steps (forward, backward, AdamW) of the configured model on a
    random batch of `batch_size` x `seq_len` tokens after one warm-up step, and a few decode steps."""
    import torch

    from ..data import Tokenized, score_batch
    from ..logprobs import score
    from ..models import load_lm

    lm = load_lm(m.name, m.device, m.precision, m.trust_remote_code, m.max_length)
    seq_len = max(4, min(seq_len, lm.max_length))
    vocab = int(lm.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    half = seq_len // 2
    items = [Tokenized(rand(half), [rand(seq_len - half)]) for _ in range(batch_size)]
    batch = score_batch(items, lm.tokenizer.pad_token_id).to(lm.device)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-12)
    lm.model.train()

    def sync():
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)

    def step():
        logps, mask = score(lm, batch)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    tps = steps * batch.n_tokens / (time.perf_counter() - t)
    lm.model.eval()
    ids = torch.tensor([rand(32) for _ in range(4)], device=lm.device)
    with torch.no_grad(), lm.autocast():
        lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                          do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        sync()
        t = time.perf_counter()
        lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_steps,
                          min_new_tokens=decode_steps, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        sync()
    dec = (time.perf_counter() - t) / decode_steps
    return Throughput(tps, dec, f"measured here ({m.name} on {lm.device}, {lm.precision}, {steps} steps of "
                                f"{batch_size}x{seq_len} tokens): {tps:.0f} tokens/s")


def estimate(runs: list[PlannedRun], measure: bool = False) -> tuple[list[RunEstimate], dict]:
    """Per-run estimates and notes on how they were made (see the module doc)."""
    est = _Estimator(measure)
    out = []
    trained: set[str] = set()  # stages that an earlier run trains (a later identical one is reused)
    for r in runs:
        stages = []
        for i, s in enumerate(r.config.stages):
            if r.config.reuse_stages:
                key = r.config.stage_key(i)
                if key in trained:
                    stages.append(StageEstimate(s.name, None, s.epochs, 0.0, 0.0, reused=True))
                    continue
                trained.add(key)
                if s.expo_lambda is not None:  # a λ sweep trains each stage once (stage.reuse_training)
                    key = "trained-" + r.config.stage_key(i, trained=True)
                    if key in trained:
                        stages.append(est.stage(r.config.model, s, first=i == 0, trains=False))
                        continue
                    trained.add(key)
            stages.append(est.stage(r.config.model, s, first=i == 0))
        out.append(RunEstimate(r, stages))
    return out, est.notes()


class _Estimator:
    """One study's estimate: data statistics and throughputs, each found once and shared by its runs."""

    def __init__(self, measure: bool):
        self.measure = measure
        self.tokens = _Tokens()
        self.data: dict[tuple, tuple[DataStats, DataStats] | None] = {}
        self.throughputs: dict[str, Throughput] = {}
        self.unavailable: list[str] = []
        self.evaluated: set[str] = set()  # base-model evaluations (cached, shared by runs that start alike)

    def stats(self, stage: StageConfig, model: str) -> tuple[DataStats, DataStats] | None:
        """(train, dev) statistics of the stage's data, or None where it does not load."""
        from ..tasks import get_task, training_task

        key = (model, stage.task.model_dump_json(exclude={"generation", "pairs"}))
        if key not in self.data:
            try:
                task = get_task(stage.task)
                train = self.tokens.stats(training_task(stage.task).train_examples(), model, task.append_eos)
                try:
                    dev = self.tokens.stats(task.dev_examples(), model, task.append_eos)
                except PostlabError:
                    dev = DataStats(0, 0.0, 0.0, False)
                self.data[key] = (train, dev)
            except PostlabError as e:
                self.data[key] = None
                self.unavailable.append(f"{stage.task.name}: {e}")
        return self.data[key]

    def throughput(self, m: ModelConfig, seq: float, batch: int) -> Throughput:
        key = m.model_dump_json(exclude={"max_length"})
        if key not in self.throughputs:
            self.throughputs[key] = (measure_throughput(m, int(seq) or 128, batch) if self.measure
                                     else default_throughput(m))
        return self.throughputs[key]

    def stage(self, m: ModelConfig, s: StageConfig, first: bool, trains: bool = True) -> StageEstimate:
        """A stage's cost; without `trains`, only its data, extrapolation and final evaluation (ExPO)."""
        from ..tasks import get_task

        st = self.stats(s, m.name)
        if st is None:
            return StageEstimate(s.name, None, s.epochs, None, None)
        train, dev = st
        spec = s.objective.spec
        n, per_example, gen_steps = _training_sizes(s, train)
        batch = s.optim.batch_size * s.optim.grad_accum
        steps_per_epoch = math.ceil(n / batch) if n else 0
        steps = min(steps_per_epoch * s.epochs, s.max_steps if s.max_steps is not None else math.inf) if trains else 0
        epochs = steps / steps_per_epoch if steps_per_epoch else 0.0
        train_tokens = n * per_example * epochs
        fwd = n * per_example if (spec.needs_reference or spec.topk_of) else 0.0
        if not trains:  # its pairs and reference pass are cached by the run that trained it
            fwd, gen_steps = 0.0, 0.0
        full, subset = self._evaluations(m, s, first, steps, epochs, trains)
        task = get_task(s.task)
        for count, n_dev in ((full, dev.n), (subset, min(s.curve_examples or dev.n, dev.n))):
            cost = task.eval_cost(n_dev)  # asked of the task: what one evaluation scores and generates
            fwd += count * n_dev * (dev.prompt_tokens + (dev.completion_tokens if cost.scores_completions else 0))
            gen_steps += count * cost.decode_steps
        if s.against_reference:
            ref_fwd, ref_steps = _against_reference_cost(s, dev)
            fwd, gen_steps = fwd + ref_fwd, gen_steps + ref_steps
        tp = self.throughput(m, per_example, s.optim.batch_size)
        seconds = ((train_tokens + FORWARD_COST * fwd) / tp.tokens_per_s + gen_steps * tp.decode_step_s
                   + STAGE_OVERHEAD_S[_device_type(m)])
        return StageEstimate(s.name, n, epochs, train_tokens, seconds, extrapolated=not trains)

    def _evaluations(self, m: ModelConfig, s: StageConfig, first: bool, steps: int, epochs: float,
                     trains: bool) -> tuple[int, int]:
        """(evaluations of the whole dev set, of the learning-curve subset) that a stage makes. Its
        starting evaluation is cached: the previous stage's final one, or (first stage) the base
        model's, evaluated once per task and evaluation settings; an ExPO stage evaluates once more."""
        start_key = m.model_dump_json() + json.dumps(s.task.evaluation_settings(), sort_keys=True)
        start = s.eval_at_start and first and start_key not in self.evaluated
        self.evaluated.add(start_key)
        expo = int(s.expo_lambda is not None)  # an ExPO stage evaluates once more
        if not trains:
            return expo, 0
        between = max(math.ceil(epochs) - 1, 0) + ((steps - 1) // s.eval_every_steps if s.eval_every_steps and steps else 0)
        full = int(start) + int(steps > 0) + expo + (0 if s.curve_examples else between)
        return full, between if s.curve_examples else 0

    def notes(self) -> dict[str, Any]:
        methods = self.tokens.methods
        return {"unavailable": self.unavailable,
                "tokens": ("the model's tokenizer on a sample of up to %d examples per data set" % TOKENIZER_SAMPLE
                           if methods == {"tokenizer"} else
                           "characters / 4" if methods == {"chars/4"} else
                           "the tokenizer where it loads locally, else characters / 4"),
                "throughput": sorted({t.source for t in self.throughputs.values()}),
                "measured": self.measure}


def _against_reference_cost(s: StageConfig, dev: DataStats) -> tuple[float, float]:
    """(forward tokens, decode steps) of a stage's `against_reference` reading of its first
    `against_reference_examples` held-out pairs (postlab.diagnose): the policy's and the reference's
    log-probs of both answers, then both models' full next-token distributions at the chosen answer's
    contexts (four forwards of each pair), after sampling the rejected answers where the task samples its
    pairs (as the training pairs are)."""
    from ..data import forward_tokens
    from ..preferences import draws, needs_sampler
    from ..tasks import get_task

    n = min(s.against_reference_examples or dev.n, dev.n)
    per_pair = (dev.prompt_tokens + 1 if dev.single_token
                else forward_tokens(dev.prompt_tokens, [dev.completion_tokens] * 2))
    gen = s.task.pairs.generation
    steps = math.ceil(n / gen.batch_size) * draws(s.task.pairs) * gen.max_new_tokens if needs_sampler(get_task(s.task)) else 0
    return 4 * n * per_pair, float(steps)


def _training_sizes(s: StageConfig, train: DataStats) -> tuple[int, float, float]:
    """(training items, tokens of one item's forward, decode steps of sampling pairs before training)."""
    from ..data import forward_tokens
    from ..tasks import training_task

    completion = train.completion_tokens
    if s.task.max_completion_tokens:
        completion = min(completion, s.task.max_completion_tokens)
    spec = s.objective.spec
    if spec.kind == "sft":
        return train.n, train.prompt_tokens + completion, 0.0
    from ..preferences import draws, needs_sampler

    n, gen_steps = train.n, 0.0
    if needs_sampler(training_task(s.task)):
        n = train.n * s.task.pairs.k
        gen_steps = (math.ceil(train.n / s.task.pairs.generation.batch_size) * draws(s.task.pairs)
                     * s.task.pairs.generation.max_new_tokens)
    # a pair scores two answers; an unpaired item its own and, for a KL baseline, its partner's (two per pair)
    answers = 2 if spec.kind == "preference" or spec.needs_kl_baseline else 1
    per_example = (train.prompt_tokens + 1 if train.single_token
                   else forward_tokens(train.prompt_tokens, [completion] * answers))
    return n * (2 if spec.kind == "unpaired" else 1), per_example, gen_steps


def human_s(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "?"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def human_n(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


