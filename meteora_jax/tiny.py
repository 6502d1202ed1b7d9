"""The embedded tiny world of `configs/tiny.py`: everything gate training needs, made offline.

    paths = build_tiny_world("runs/tiny_world", model_config)
    paths.tokenizer   # HF tokenizer folder (byte-free BPE over the tasks' characters)
    paths.data_root   # <root>/{arith,reverse,shout}/{train,test}.jsonl
    paths.model       # model checkpoint: random tiny LLaMA + 3 random adapters + gates
                      # (or a plain one with num_adapters 0, which MixLoRA trains its experts on)

Three generated tasks with clearly distinct formats and characters, so a per-token gate can tell
them apart:

    arith    "417+26="            -> "443"                 digits and + =
    reverse  "reverse lamp dog"   -> "god pmal"            lower-case words
    shout    "SHOUT QUIET RIVER"  -> "QUIET RIVER!"        upper-case words and !

Building is deterministic; a folder already holding the same world (same spec; routing settings
such as top_k may differ) is reused, and a new one is written to a temporary folder and renamed, so
concurrent builders do not collide. A folder holding another world, or anything else, is refused
and left as it is (gates trained on a world only fit that world's model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import string
import tempfile

import jax
import numpy as np
from flax import traverse_util

from meteora_jax.config import ModelConfig, describe_changes

__all__ = ["TASKS", "TinyWorld", "TinyWorldError", "build_tiny_world", "task_records"]

TASKS = ("arith", "reverse", "shout")
_VERSION = 1
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_WORDS = (
    "lamp dog river cloud stone apple green quiet bread horse light music paper table water sugar "
    "night plant window garden tiger candle mirror forest ocean pencil rocket silver winter yellow"
).split()


@dataclasses.dataclass(frozen=True)
class TinyWorld:
    root: str
    tokenizer: str
    data_root: str
    model: str
    adapter_names: tuple[str, ...]


def _arith(rng: np.random.Generator) -> dict:
    a, b = int(rng.integers(0, 1000)), int(rng.integers(0, 1000))
    return {"prompt": f"{a}+{b}=", "response": str(a + b)}


def _reverse(rng: np.random.Generator) -> dict:
    words = [_WORDS[i] for i in rng.choice(len(_WORDS), size=int(rng.integers(2, 4)), replace=False)]
    return {"prompt": "reverse " + " ".join(words), "response": " ".join(w[::-1] for w in reversed(words))}


def _shout(rng: np.random.Generator) -> dict:
    words = [_WORDS[i].upper() for i in rng.choice(len(_WORDS), size=int(rng.integers(2, 4)), replace=False)]
    return {"prompt": "SHOUT " + " ".join(words), "response": " ".join(words) + "!"}


_MAKERS = {"arith": _arith, "reverse": _reverse, "shout": _shout}


def task_records(task: str, n: int, seed: int) -> list[dict]:
    """n deterministic {"prompt", "response"} records of one tiny task."""
    rng = np.random.default_rng((seed, TASKS.index(task)))
    return [_MAKERS[task](rng) for _ in range(n)]


def _build_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Every printable ASCII character and the newline are tokens: the tasks' own text lacks ".", "\n"
    # and "@", which composite prompts ("1. ...\n2. ...") and answers use; they were <unk>.
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _spec(model_config: ModelConfig, n_train: int, n_test: int, seed: int) -> dict:
    from meteora_jax import checkpoint

    return {
        "checkpoint_format": [checkpoint.FORMAT, checkpoint.VERSION],
        "version": _VERSION,
        "model": model_config.to_dict(),
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "tasks": list(TASKS),
    }


class TinyWorldError(ValueError):
    """The tiny world's folder holds something else: another world, or files that are not one."""


# Model settings that the world's files do not depend on (the run's config supplies them).
_ROUTING_ONLY = ("top_k", "kernel_impl")


def _files_spec(spec) -> dict | None:
    """The part of a world's spec that its files depend on."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return None
    spec = json.loads(json.dumps(spec))  # as stored (tuples as lists)
    model = spec["model"]
    model["meteora"] = {k: v for k, v in dict(model.get("meteora") or {}).items() if k not in _ROUTING_ONLY}
    return {**spec, "model": model}


def _spec_changes(old, new: dict) -> str:
    """'model.hidden_size 64 -> 32, ...': the keys of the files' spec that differ."""
    old_flat, new_flat = (traverse_util.flatten_dict(_files_spec(spec) or {}, sep=".") for spec in (old, new))
    return describe_changes(old_flat, new_flat)


def _paths(root: str, with_adapters: bool) -> TinyWorld:
    return TinyWorld(
        root=root,
        tokenizer=os.path.join(root, "tokenizer"),
        data_root=os.path.join(root, "data"),
        model=os.path.join(root, "model"),
        adapter_names=TASKS if with_adapters else (),
    )


def build_tiny_world(
    root: str | os.PathLike,
    model_config: ModelConfig,
    *,
    n_train: int = 256,
    n_test: int = 48,
    seed: int = 0,
) -> TinyWorld:
    """Builds (or finds) the tiny world in `root` for a model with `len(TASKS)` adapters, or none."""
    from meteora_jax.data import write_jsonl
    from meteora_jax.model import init_params
    from meteora_jax.checkpoint import save_checkpoint

    root = os.path.abspath(os.fspath(root))
    if model_config.meteora.num_adapters not in (0, len(TASKS)):
        raise TinyWorldError(
            f"the tiny world has {len(TASKS)} tasks; model.meteora.num_adapters is {model_config.meteora.num_adapters} "
            f"(give {len(TASKS)}, one adapter per task, or 0 for a plain model, as MixLoRA trains on)"
        )
    if model_config.mixlora.num_experts:  # a converted checkpoint has none: training adds them
        raise TinyWorldError("the tiny world's model has no MixLoRA experts: build it without model.mixlora")
    if os.path.exists(root) and not os.path.isdir(root):
        raise TinyWorldError(f"{root} is a file, not a folder: set config.tiny_world to a new folder")
    spec = _spec(model_config, n_train, n_test, seed)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    stamp = os.path.join(root, "WORLD.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            stored = json.load(f)
        if stored.get("digest") == digest or _files_spec(stored.get("spec")) == _files_spec(spec):
            return _paths(root, bool(model_config.meteora.num_adapters))
        # Gates trained on the old world (e.g. runs/tiny/gates) would no longer fit its model.
        raise TinyWorldError(
            f"{root} holds a tiny world built for another model ({_spec_changes(stored.get('spec'), spec)}); "
            "it is left as it is: set config.tiny_world to another folder, or delete this one")
    if os.path.isdir(root) and os.listdir(root):
        raise TinyWorldError(f"{root} is not empty and holds no tiny world (no WORLD.json): it is left as it is; "
                             "set config.tiny_world to a new folder")

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-world-", dir=parent)
    try:
        world = _paths(tmp, bool(model_config.meteora.num_adapters))
        splits = {}
        for task in TASKS:
            records = task_records(task, n_train + n_test, seed)
            splits[task] = {"train": records[:n_train], "test": records[n_train:]}
            os.makedirs(os.path.join(world.data_root, task))
            for split, recs in splits[task].items():
                write_jsonl(os.path.join(world.data_root, task, f"{split}.jsonl"), recs)
        corpus = [r["prompt"] + " " + r["response"] for t in TASKS for r in splits[t]["train"]]
        tokenizer = _build_tokenizer(corpus, vocab_size=model_config.vocab_size)
        if len(tokenizer) > model_config.vocab_size:
            raise TinyWorldError(f"the tiny tokenizer has {len(tokenizer)} tokens: model.vocab_size={model_config.vocab_size} "
                                 "is too small for it (nothing was written)")
        tokenizer.save_pretrained(world.tokenizer)
        params = init_params(model_config, jax.random.key(seed))
        save_checkpoint(world.model, params, model_config, {"adapters": [{"name": task} for task in world.adapter_names]})
        with open(os.path.join(tmp, "WORLD.json"), "w") as f:
            json.dump({"digest": digest, "spec": spec}, f, indent=1)
        if os.path.isdir(root) and not os.listdir(root):  # (a non-empty one: another builder's, same world)
            os.rmdir(root)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first with the same world
            if not os.path.isfile(stamp):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root, bool(model_config.meteora.num_adapters))
