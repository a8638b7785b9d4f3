"""Preference data for a stage, paired or unpaired: the one place that builds it.

Tasks with pairs of their own (a label task: chosen = the right answer; file: prompt/chosen/rejected
records) give them through ``task.preference_pairs("train")``. Tasks that declare
``sampled_rejected`` (sonnets) have only prompt/completion data; their pairs are built here:

- chosen = the true completion of a *training* example (``task.train_examples()``; dev data is
  never read),
- rejected = a completion sampled from a model (``PairsConfig.rejected_from``) with the stated
  sampling settings (``PairsConfig.generation``), cleaned by the task's ``clean`` function
  (sonnets: cut exactly as its evaluation cuts a generation).

Strategies:
- ``same-sonnet``: k draws per prompt; each gives one pair (k pairs per training example).
- ``top-k``: n draws per prompt, scored against the truth by the task's ``score`` (sonnets:
  sentence chrF); the k lowest-scoring become rejected answers (ties: the earlier draw first).

Draw j (0-based) of every prompt comes from one ``generate`` call over all prompts with the seed
``draw_seed(generation.seed, j)``, so draws are reproducible, differ from each other, and the first
draws of a larger k (or n) are the draws of a smaller one. A sample equal to the true completion
(possible after SFT memorizes the data) makes no pair and is counted in a warning.

Unpaired examples (KTO: completions labelled desirable or not) are the task's own
(``task.unpaired_examples``), or for a task whose rejected answers are sampled its pairs built here,
unpaired (``build_unpaired``). Where the objective needs a KL baseline, each tokenized item gets a
second completion, another item's (``with_mismatched``): its mismatched pair.

Raw samples are cached as JSON under ``cache_dir`` (atomic write), keyed by a sha256 of the
sampler's weights, its tokenizer's vocabulary, its compute precision and device type, the prompts,
the generation settings, the strategy, k and n. The same key reuses the file ("reusing cached
samples"); a file that does not match its key or is unreadable is resampled.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .checkpoint import atomic_write_json
from .config import PairsConfig
from .data import Pair, Tokenized, UnpairedExample
from .errors import ConfigError, DataError
from .lazy import lazy
from .tasks.base import unpair

if TYPE_CHECKING:
    from .models import LM

sampling = lazy("postlab.generate")

log = logging.getLogger("postlab")

# 2: drawn by generate.SampleNucleus (postlab 0.1.4); the same seed drew other text before
CACHE_VERSION = 2


def needs_sampler(task) -> bool:
    """True when the task's pairs are built from samples (a sampler model must be loaded)."""
    return task.sampled_rejected is not None


def draws(cfg: PairsConfig) -> int:
    """Samples drawn per prompt."""
    return cfg.n if cfg.strategy == "top-k" else cfg.k


def draw_seed(seed: int, j: int) -> int:
    """The seed of draw j: derived from (seed, j) by hashing, so neighbouring seeds' draws do not
    coincide (seed 1 draw 0 is not seed 0 draw 1)."""
    if j == 0:
        return seed
    digest = hashlib.sha256(f"postlab-pairs:{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def samples_key(sampler_weights: str, tokenizer: str, precision: str, device: str, prompts: list[str],
                cfg: PairsConfig) -> str:
    parts = {"version": CACHE_VERSION, "weights": sampler_weights, "tokenizer": tokenizer, "precision": precision,
             "device": device, "prompts": prompts, "generation": cfg.generation.model_dump(mode="json"),
             "strategy": cfg.strategy, "k": cfg.k, "n": cfg.n}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def sampler_identity(lm: LM) -> dict[str, str]:
    """What, besides prompts and settings, determines the samples (hashes the weights: ~1 s per
    100M parameters)."""
    from .cache import tokenizer_fingerprint, weights_hash

    return {"weights": weights_hash(lm.model), "tokenizer": tokenizer_fingerprint(lm.tokenizer),
            "precision": lm.precision, "device": lm.device.type}


def _load_cached(path: Path, key: str, n_prompts: int, m: int) -> list[list[str]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        samples = data["samples"]
        ok = (data.get("key") == key and len(samples) == n_prompts
              and all(isinstance(s, list) and len(s) == m and all(isinstance(t, str) for t in s) for s in samples))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable sample cache (%s); sampling again", path, e)
        return None
    if not ok:
        log.warning("%s: sample cache does not match its key; sampling again", path)
        return None
    return samples


def sample_completions(sampler: LM, prompts: list[str], cfg: PairsConfig, cache_dir: Path,
                       tag: str = "samples") -> tuple[list[list[str]], Path]:
    """Raw samples, draws(cfg) per prompt ([prompt][draw]), from the cache when the key matches.
    Returns them with the cache file's path."""
    m = draws(cfg)
    ident = sampler_identity(sampler)
    key = samples_key(ident["weights"], ident["tokenizer"], ident["precision"], ident["device"], prompts, cfg)
    path = Path(cache_dir) / f"{tag}-{key[:32]}.json"
    from .cache import lock

    with lock(f"samples-{key[:32]}"):  # runs side by side sample once; the others read the file
        return _sample_completions(sampler, prompts, cfg, path, key, ident, m)


def _sample_completions(sampler: LM, prompts: list[str], cfg: PairsConfig, path: Path, key: str, ident: dict,
                        m: int) -> tuple[list[list[str]], Path]:
    if path.is_file():
        got = _load_cached(path, key, len(prompts), m)
        if got is not None:
            log.info("preference pairs: reusing cached samples %s", path)
            return got, path
    per_draw = []
    for j in range(m):
        gen = cfg.generation.model_copy(update={"seed": draw_seed(cfg.generation.seed, j)})
        per_draw.append(sampling.generate(sampler, prompts, gen, desc=f"sampling rejected answers ({j + 1}/{m})"))
    samples = [[per_draw[j][i] for j in range(m)] for i in range(len(prompts))]
    atomic_write_json(path, {"key": key, "version": CACHE_VERSION, "sampler": {**ident, "source": sampler.source},
                             "settings": {"strategy": cfg.strategy, "k": cfg.k, "n": cfg.n,
                                          "generation": cfg.generation.model_dump(mode="json")},
                             "prompts": prompts, "samples": samples})
    log.info("preference pairs: sampled %d x %d completions, cached at %s", len(prompts), m, path)
    return samples, path


def select_rejected(candidates: list[str], truth: str, cfg: PairsConfig,
                    score: Callable[[str, str], float]) -> list[tuple[int, str]]:
    """(draw index, text) of the rejected answers for one prompt, from its cleaned candidates.
    same-sonnet: all of them in draw order; top-k: the k lowest-scoring, lowest first."""
    if cfg.strategy == "same-sonnet":
        return list(enumerate(candidates))
    scored = sorted(range(len(candidates)), key=lambda j: (score(candidates[j], truth), j))
    return [(j, candidates[j]) for j in scored[:cfg.k]]


def build_pairs(task, cfg: PairsConfig, sampler_lm: LM | None, cache_dir: Path, split: str = "train") -> list[Pair]:
    """The preference pairs of `task`'s training data (or, with split="dev", of its dev data, held out to
    measure a model against its reference): its own, or built from samples of `sampler_lm`."""
    if not needs_sampler(task):
        if cfg != PairsConfig() and split == "train":
            log.warning("task %s has preference pairs of its own; task.pairs settings are ignored", task.name)
        return task.preference_pairs(split)
    if sampler_lm is None:
        raise ConfigError(f"task {task.name!r} samples its rejected answers: build_pairs needs a sampler model")
    spec = task.sampled_rejected
    # training pairs from training data only: dev examples never enter them
    examples = task.train_examples() if split == "train" else task.dev_examples()
    samples, _ = sample_completions(sampler_lm, [ex.prompt for ex in examples], cfg, cache_dir, tag=task.name)
    pairs: list[Pair] = []
    same_as_truth = 0
    for i, (ex, raw) in enumerate(zip(examples, samples)):
        candidates = [spec.clean(s) for s in raw]
        for j, text in select_rejected(candidates, ex.completion, cfg, spec.score):
            if text.strip() == ex.completion.strip():
                same_as_truth += 1
                continue
            pairs.append(Pair(ex.prompt, ex.completion, text, f"{ex.id or i}/s{j}"))
    if same_as_truth:
        log.warning("preference pairs: %d sampled answer(s) equal the true completion and made no pair",
                    same_as_truth)
    if not pairs:
        raise DataError(f"task {task.name}: every sampled answer equals the true completion; no preference pairs")
    return pairs


def build_unpaired(task, cfg: PairsConfig, sampler_lm: LM | None, cache_dir: Path) -> list[UnpairedExample]:
    """The training examples of an unpaired (KTO) stage: the task's own, or for a task whose rejected
    answers are sampled (sonnets) the pairs `build_pairs` makes, unpaired (chosen desirable, rejected not)."""
    if needs_sampler(task):
        return unpair(build_pairs(task, cfg, sampler_lm, cache_dir))
    return task.unpaired_examples("train")


# The order partners are drawn from: the same for every run seed, so runs that differ only in their seed
# share the reference pass of their (identical) items.
PARTNER_SEED = 0


def with_mismatched(items: list[Tokenized], max_length: int, seed: int = PARTNER_SEED) -> list[Tokenized]:
    """Each unpaired item with a second completion, its partner's, to be scored after its own prompt: the
    mismatched pair (x_i, y'_i) of KTO's KL baseline. Partners are fixed here, once: a rotation by one of a
    seeded shuffle of the items (each completion is one item's partner), the shuffle repaired by swaps so
    that no item's partner has its prompt (`_rotation`). A partner's completion is cut to fit the item's
    prompt within `max_length`.

    TRL 1.16 rotates completions by one within consecutive chunks of per_device_train_batch_size examples
    of the dataset order, also once, before training (its sampler then shuffles, with transformers >= 5.2),
    and does not avoid a partner with the same prompt. Given the mismatched pairs, the loss is TRL's."""
    order = _rotation([it.prompt for it in items], seed)
    out: list[Tokenized] = list(items)
    for j, i in enumerate(order):
        prompt = items[i].prompt
        partner = items[order[j - 1]].completions[0][:max(1, max_length - len(prompt))]
        out[i] = Tokenized(prompt, [items[i].completions[0], partner], items[i].id, items[i].label)
    return out


def _rotation(prompts: list, seed: int) -> list[int]:
    """A seeded order of the items in which neighbours (cyclically) have different prompts where swaps can
    make it so: a shuffle, then each clash (an item after one with its prompt) swapped away with the first
    position that leaves all four neighbourhoods it touches clash-free."""
    import random

    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n = len(order)

    def clash(j: int) -> bool:
        return n > 1 and prompts[order[j % n]] == prompts[order[j % n - 1]]

    for j in range(n):
        if not clash(j):
            continue
        for k in range(n):
            order[j], order[k] = order[k], order[j]
            if not any(clash(x) for x in (j, j + 1, k, k + 1)):
                break
            order[j], order[k] = order[k], order[j]
    return order
