"""Task datasets for gate training: JSONL files -> tokenised arrays -> balanced, resumable batches.

Layout (DESIGN.md section 6)::

    <root>/<task>/train.jsonl   one {"prompt": str, "response": str} per line
    <root>/<task>/test.jsonl

Tasks are matched to adapters by name and indexed in the adapter order of the checkpoint metadata,
so `gate_labels` is the index of the task's adapter in that list.

Per example, every array has the fixed sequence length S (right padding):

    input_ids      [S] int32  tokens, then pad_token_id (eos if the tokenizer has no pad)
    lm_labels      [S] int32  = input_ids (the loss shifts: logits[:, :-1] predict lm_labels[:, 1:])
    lm_mask        [S] int32  1 where a token is an LM target: response (+ its end token) only, or
                              prompt + response with `lm_on_prompt=True` (as the original)
    gate_labels    [S] int32  the adapter index of the example's task, on every position
    gate_mask      [S] int32  1 on every non-padding token but a leading BOS (`gate_scope="all"`,
                              as the original, which tokenises without one), or from the first
                              token of the prompt text on (`gate_scope="task"`: not on the BOS or
                              the chat template's head, e.g. a default system prompt, which are
                              the same for every task and so carry no task to route by)
    attention_mask [S] int32  1 on every non-padding token

Validation (file, line, field; missing folders; empty files) happens before any tokenisation, and
every problem is a `DataError`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from meteora_jax.files import written_whole

__all__ = [
    "ARRAY_KEYS",
    "COMPOSITE_SEPARATOR",
    "BalancedBatchIterator",
    "DataError",
    "build_composite",
    "encode_example",
    "eval_batches",
    "find_task_dirs",
    "load_task_datasets",
    "read_composite_jsonl",
    "read_jsonl",
    "task_folders",
    "tokenize_records",
    "write_jsonl",
]

ARRAY_KEYS = ("input_ids", "lm_labels", "lm_mask", "gate_labels", "gate_mask", "attention_mask")
GATE_SCOPES = ("all", "task")  # which tokens the gate loss (and gate accuracy) covers
COMPOSITE_SEPARATOR = "@@@@\n"  # between sub-answers of a composite sample (DESIGN.md section 6)
SEPARATOR_MARK = COMPOSITE_SEPARATOR.strip()  # what the scorer splits at, whatever whitespace surrounds it
_MIXING = ("round_robin", "uniform")


class DataError(ValueError):
    """Bad task data or data settings: raised before any heavy work, with file/line where known."""


# ----------------------------------------------------------------------------------------------
# Reading and validating JSONL


TASK_FIELDS = {"prompt": str, "response": str}  # what every task and composite record holds


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file without their line ends (split on newlines only, not on the
    other Unicode line separators a JSON string may hold); a `DataError` naming the file if it is
    missing or not UTF-8."""
    if not os.path.isfile(path):
        raise DataError(f"{os.fspath(path)}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path, encoding="utf-8") as f:
            return [line.removesuffix("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as e:
        raise DataError(f"{os.fspath(path)}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _is_utf8_encodable(text: str) -> bool:
    # json.loads accepts a lone "\ud800"; Arrow (datasets) and tokenizers cannot encode it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(
    path: str | os.PathLike,
    *,
    fields: Mapping[str, type] = TASK_FIELDS,
    extra_fields: Mapping[str, type] | None = None,
    check: Callable[[dict], str | None] | None = None,
) -> list[dict]:
    """Reads JSONL lines holding `fields` (by default `{"prompt": str, "response": str}`), validating
    each one.

    `extra_fields` names further required fields and their types (e.g. `{"tasks": list}` for
    composite files); `check(record)` may return a further complaint about a record.
    Blank lines are skipped. Unknown fields are kept.
    Raises `DataError` naming the file and the 1-based line number of the first bad line, and for
    a file without any record.
    """
    path = os.fspath(path)
    required = {**fields, **(extra_fields or {})}
    records = []
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for field, typ in required.items():
            if field not in obj:
                raise DataError(f"{path}:{lineno}: missing field {field!r}")
            if not isinstance(obj[field], typ):
                raise DataError(
                    f"{path}:{lineno}: field {field!r} must be {typ.__name__}, "
                    f"got {type(obj[field]).__name__}"
                )
            if isinstance(obj[field], str) and not _is_utf8_encodable(obj[field]):
                raise DataError(f"{path}:{lineno}: field {field!r} holds an unpaired surrogate escape (e.g. \\ud800)")
        problem = check(obj) if check is not None else None
        if problem:
            raise DataError(f"{path}:{lineno}: {problem}")
        records.append(obj)
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    return records


def write_jsonl(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Writes one JSON object per line (UTF-8, non-ASCII kept as is), whole or not at all."""
    with written_whole(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def task_folders(root: str | os.PathLike) -> list[str]:
    """The task names of a data root: its sub-folders (hidden ones left out), sorted. A model
    without adapters (MixLoRA alone) trains on these; with adapters they must be adapter names."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"task data root {root!r} is not a folder")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not folders:
        raise DataError(f"task data root {root!r} holds no task folders")
    return folders


def find_task_dirs(
    root: str | os.PathLike, adapter_names: Sequence[str], *, split: str = "train"
) -> dict[str, str]:
    """Matches `<root>/<task>/<split>.jsonl` files to adapters.

    Returns {task: path} in adapter order (only adapters that have a task folder). A task folder
    with no adapter of that name is an error (its gate label would not exist); an adapter without a
    task folder is a warning (its gate just gets no training signal).
    """
    root = os.fspath(root)
    if len(set(adapter_names)) != len(adapter_names):
        raise DataError(f"adapter names are not unique: {list(adapter_names)}")
    folders = task_folders(root)
    unknown = [d for d in folders if d not in adapter_names]
    if unknown:
        raise DataError(
            f"task folder(s) {unknown} in {root!r} match no adapter; adapters are {list(adapter_names)}"
        )
    missing = [a for a in adapter_names if a not in folders]
    if missing:
        warnings.warn(f"adapter(s) {missing} have no task folder in {root!r}; their gates get no data")
    out = {}
    for name in adapter_names:
        if name not in folders:
            continue
        path = os.path.join(root, name, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"task folder {os.path.join(root, name)!r} has no {split}.jsonl")
        out[name] = path
    return out


# ----------------------------------------------------------------------------------------------
# Tokenisation


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer saved in the folder `path`, or the one inside a GGUF file (never a Hub
    download: a wrong path is an error naming it, not a network attempt)."""
    path = os.fspath(path)
    is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
    if not (os.path.isdir(path) or is_gguf):
        if os.path.exists(path):
            raise DataError(f"tokenizer {path!r} is neither a folder nor a .gguf file")
        raise DataError(f"tokenizer {'file' if path.lower().endswith('.gguf') else 'folder'} {path!r} does not exist")
    from transformers import AutoTokenizer

    try:
        if is_gguf:
            return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds, some with several lines of advice
        raise DataError(f"cannot load the tokenizer from {path!r}: {' '.join(str(e).split())}") from None


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("tokenizer has neither a pad nor an eos token: cannot pad")
    return int(pad)


def tokenizer_adds_bos(tokenizer) -> bool:
    # "As appropriate": follow what the tokenizer itself does with special tokens on (LLaMA adds
    # BOS, SmolLM2/Qwen do not).
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _rfind_content(text: str, content: str, start: int, end: int) -> int:
    """Where `content` starts in text[start:end] (last match), as a chat template renders it:
    as is, or stripped (the Llama-2 and Llama-3 templates trim a turn's content). An empty
    content is found at `end`; -1 if absent."""
    for candidate in (content, content.strip()):
        if not candidate:
            return end
        at = text.rfind(candidate, start, end)
        if at >= 0:
            return at
    return -1


_CONTENT_MARK = "\u2063MeteoRA\u2063"  # a user content no template alters (invisible separators)


def _prompt_start(tokenizer, full: str, prompt: str, boundary: int) -> int:
    """Where the prompt text starts in `full` (the rendered conversation; the response starts at
    `boundary`), -1 if it is not there. A short prompt ("end", "assistant") also occurs in the
    template's own text, so the template is rendered once with a marker as the user content: the
    text before the marker is where any content starts. A template whose text around the content
    depends on the content falls back to the last match inside the user turn."""
    marked = _render(tokenizer, [{"role": "user", "content": _CONTENT_MARK}])
    start = marked.find(_CONTENT_MARK)
    if start >= 0 and full.startswith(marked[:start]):
        for candidate in (prompt, prompt.strip()):  # as is, or trimmed by the template
            if full.startswith(candidate, start):
                return start
    user_turn = _render(tokenizer, [{"role": "user", "content": prompt}])
    user_end = len(user_turn) if full.startswith(user_turn) else boundary
    return _rfind_content(full, prompt, 0, min(user_end, boundary))


def _encode_chat(tokenizer, prompt: str, response: str) -> tuple[list[int], int, int]:
    """Returns (ids, n_head, n_prompt): the chat-formatted pair, how many leading tokens come
    before the prompt text (the template's head) and how many are prompt (head included)."""
    user = [{"role": "user", "content": prompt}]
    full = _render(tokenizer, user + [{"role": "assistant", "content": response}])
    head = _render(tokenizer, user, add_generation_prompt=True)
    if full.startswith(head):
        boundary = len(head)
    else:  # templates that rewrite earlier turns: find the response text itself
        boundary = _rfind_content(full, response, 0, len(full)) if response.strip() else -1
        if boundary < 0:
            raise DataError("chat template output starts neither with the prompt turn nor holds the response")
    prompt_start = _prompt_start(tokenizer, full, prompt, boundary)
    if prompt_start < 0:
        raise DataError("chat template output does not hold the prompt text")
    # The rendered text carries the template's special tokens already: no extra BOS/EOS.
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token counts as response (prompt text) if any of its characters lies past the boundary.
        n_prompt = sum(1 for _, end in enc["offset_mapping"] if end <= boundary)
        n_head = sum(1 for _, end in enc["offset_mapping"] if end <= prompt_start)
        return ids, n_head, n_prompt
    ids, head_ids = _ids(tokenizer, full), _ids(tokenizer, full[:boundary])
    if ids[: len(head_ids)] != head_ids:
        raise DataError("prompt tokens are not a prefix of prompt+response tokens; use a fast tokenizer")
    return ids, len(_ids(tokenizer, full[:prompt_start])), len(head_ids)


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    *,
    seq_len: int,
    task_index: int,
    chat_template: bool = False,
    lm_on_prompt: bool = False,
    gate_scope: str = "all",
    add_bos: bool | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Tokenises one pair into the fixed-length arrays of the module docstring.

    Without a chat template: [BOS if the tokenizer adds one] + prompt + response + [EOS], prompt
    and response tokenised separately so the boundary is exact. With one: the template applied to
    a user turn (prompt) and an assistant turn (response), as rendered. `add_bos=None` follows
    the tokenizer's own habit (checked once per call; pass it when encoding many examples).
    gate_scope: "all" or "task" (see the module docstring's gate_mask).
    Returns (arrays each [S], truncated).
    """
    if gate_scope not in GATE_SCOPES:
        raise DataError(f"gate_scope={gate_scope!r}; choose one of {GATE_SCOPES}")
    if chat_template:
        ids, n_head, n_prompt = _encode_chat(tokenizer, prompt, response)
    else:
        if add_bos is None:
            add_bos = tokenizer_adds_bos(tokenizer)
        head = [tokenizer.bos_token_id] if add_bos else []
        p, r = _ids(tokenizer, prompt), _ids(tokenizer, response)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, n_head, n_prompt = head + p + r + eos, len(head), len(head) + len(p)
    if gate_scope == "all":  # all but a leading BOS: the same token for every task (the original has none)
        n_head = int(bool(ids) and ids[0] == tokenizer.bos_token_id)
    return _to_arrays(ids, n_head, n_prompt, _pad_id(tokenizer), seq_len, task_index, lm_on_prompt)


def _to_arrays(ids, n_head, n_prompt, pad_id, seq_len, task_index, lm_on_prompt):
    truncated = len(ids) > seq_len
    ids = ids[:seq_len]  # keep the start: the prompt decides the task
    n = len(ids)
    input_ids = np.full(seq_len, pad_id, np.int32)
    input_ids[:n] = ids
    valid = np.zeros(seq_len, np.int32)
    valid[:n] = 1
    lm_mask = valid.copy()
    if not lm_on_prompt:
        lm_mask[: min(n_prompt, n)] = 0
    gate_mask = valid.copy()
    gate_mask[: min(n_head, n)] = 0
    arrays = {
        "input_ids": input_ids,
        "lm_labels": input_ids.copy(),
        "lm_mask": lm_mask,
        "gate_labels": np.full(seq_len, task_index, np.int32),
        "gate_mask": gate_mask,
        "attention_mask": valid.copy(),
    }
    return arrays, truncated


def _check_tokenizer(tokenizer, chat_template: bool, seq_len: int) -> None:
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: need at least 2 tokens for a next-token loss")
    _pad_id(tokenizer)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template=True but the tokenizer has no chat template")
    if not chat_template and tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token: responses would have no end")


def _fingerprint(*parts: Any) -> str:
    # Passed to `datasets` so it never tries to hash the tokenizer object (slow, and noisy).
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:32]


class _RecordError(DataError):
    """A record that cannot be encoded; `index` (0-based) lets the caller name its file line."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"record {index + 1}: {problem}")
        self.index, self.problem = index, problem


def _line_of_record(path: str, index: int) -> int:
    """The 1-based line of record `index` of a JSONL file (`read_jsonl` skips blank lines)."""
    records = (lineno for lineno, line in enumerate(read_text_lines(path), start=1) if line.strip())
    return next(itertools.islice(records, index, None))


def tokenize_records(
    records: Sequence[Mapping[str, str]],
    tokenizer,
    *,
    seq_len: int,
    task_index: int,
    chat_template: bool = False,
    lm_on_prompt: bool = False,
    gate_scope: str = "all",
) -> tuple[datasets.Dataset, int]:
    """Validated records -> (`datasets.Dataset` of the ARRAY_KEYS columns, each [S]; n truncated)."""
    _check_tokenizer(tokenizer, chat_template, seq_len)
    if not records:
        raise DataError("empty dataset (no records)")
    kw = dict(
        seq_len=seq_len,
        task_index=task_index,
        chat_template=chat_template,
        lm_on_prompt=lm_on_prompt,
        gate_scope=gate_scope,
        add_bos=tokenizer_adds_bos(tokenizer),
    )

    def encode(batch, indices):
        out = {k: [] for k in (*ARRAY_KEYS, "truncated")}
        for i, prompt, response in zip(indices, batch["prompt"], batch["response"]):
            try:
                arrays, truncated = encode_example(tokenizer, prompt, response, **kw)
            except DataError as e:
                raise _RecordError(i, f"prompt {prompt[:40]!r}: {e}") from None
            for k, v in arrays.items():
                out[k].append(v)
            out["truncated"].append(truncated)
        return out

    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "response": r["response"]} for r in records])
    fp = _fingerprint(
        [(r["prompt"], r["response"]) for r in records],
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "chat_template", None),
        sorted(kw.items()),
    )
    features = datasets.Features(
        {k: datasets.List(datasets.Value("int32"), length=seq_len) for k in ARRAY_KEYS}
        | {"truncated": datasets.Value("bool")}
    )
    ds = ds.map(encode, batched=True, with_indices=True, remove_columns=["prompt", "response"], features=features, new_fingerprint=fp)
    n_truncated = int(sum(ds["truncated"]))
    ds = ds.remove_columns("truncated").with_format("numpy", dtype=np.int32)
    return ds, n_truncated


def load_task_datasets(
    root: str | os.PathLike,
    adapter_names: Sequence[str],
    tokenizer,
    *,
    split: str = "train",
    seq_len: int,
    chat_template: bool = False,
    lm_on_prompt: bool = False,
    gate_scope: str = "all",
) -> dict[str, datasets.Dataset]:
    """`<root>/<task>/<split>.jsonl` for every adapter -> {task: Dataset}, in adapter order.

    Each Dataset has the ARRAY_KEYS columns as numpy [S] int32 rows; `gate_labels` holds the index
    of the task in `adapter_names`. All files are validated before any tokenisation. Truncation to
    `seq_len` is reported once, as a warning with counts per task.
    """
    _check_tokenizer(tokenizer, chat_template, seq_len)
    if gate_scope not in GATE_SCOPES:
        raise DataError(f"gate_scope={gate_scope!r}; choose one of {GATE_SCOPES}")
    paths = find_task_dirs(root, adapter_names, split=split)
    records = {task: read_jsonl(path) for task, path in paths.items()}  # all validated first
    out, truncated = {}, {}
    for task, recs in records.items():
        try:
            out[task], n = tokenize_records(
                recs,
                tokenizer,
                seq_len=seq_len,
                task_index=list(adapter_names).index(task),
                chat_template=chat_template,
                lm_on_prompt=lm_on_prompt,
                gate_scope=gate_scope,
            )
        except _RecordError as e:
            raise DataError(f"{paths[task]}:{_line_of_record(paths[task], e.index)}: {e.problem}") from None
        if n:
            truncated[task] = n
    if truncated:
        total = sum(len(r) for r in records.values())
        warnings.warn(
            f"{sum(truncated.values())} of {total} {split} examples longer than seq_len={seq_len} "
            f"were truncated (per task: {truncated})"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Batching


def _as_task_list(task_datasets) -> list[datasets.Dataset]:
    items = list(task_datasets.values()) if isinstance(task_datasets, Mapping) else list(task_datasets)
    if not items:
        raise DataError("no task datasets to batch from")
    for i, ds in enumerate(items):
        if len(ds) == 0:
            raise DataError(f"task dataset {i} is empty")
        missing = [k for k in ARRAY_KEYS if k not in ds.column_names]
        if missing:
            raise DataError(f"task dataset {i} lacks columns {missing}")
    return [ds.with_format("numpy", dtype=np.int32) for ds in items]


class BalancedBatchIterator:
    """Endless batches `{key: np.ndarray [B, S]}` mixing tasks evenly, resumable exactly.

    Task of each row (`mixing`):
      - "round_robin" (default): row r of batch b takes task (b * B + r) % T, so every task gets
        the same number of rows, whatever the dataset sizes (small tasks are repeated more often).
      - "uniform": each row's task is drawn uniformly at random (seeded by (seed, b)).
    Within a task, examples follow a permutation seeded by (seed, task, epoch); when a task runs
    out, its epoch advances and it is reshuffled. Everything random is derived from plain ints, so
    `state_dict()` (step, cursors, epochs) is all that resume needs.
    """

    def __init__(self, task_datasets, batch_size: int, *, seed: int = 0, mixing: str = "round_robin"):
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if mixing not in _MIXING:
            raise DataError(f"mixing={mixing!r} must be one of {_MIXING}")
        self._data = _as_task_list(task_datasets)
        self.task_names = list(task_datasets) if isinstance(task_datasets, Mapping) else None
        self.batch_size, self.seed, self.mixing = int(batch_size), int(seed), mixing
        self._sizes = [len(ds) for ds in self._data]
        self._step = 0
        self._cursors = [0] * len(self._data)
        self._epochs = [0] * len(self._data)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _perm(self, t: int) -> np.ndarray:
        epoch = self._epochs[t]
        cached = self._perm_cache.get(t)
        if cached is None or cached[0] != epoch:
            perm = np.random.default_rng((self.seed, 0, t, epoch)).permutation(self._sizes[t])
            self._perm_cache[t] = cached = (epoch, perm)
        return cached[1]

    def _row_tasks(self, step: int) -> np.ndarray:
        n_tasks, b = len(self._data), self.batch_size
        if self.mixing == "round_robin":
            return (step * b + np.arange(b)) % n_tasks
        return np.random.default_rng((self.seed, 1, step)).integers(0, n_tasks, size=b)

    def _take(self, t: int, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self._cursors[t] == self._sizes[t]:
                self._cursors[t], self._epochs[t] = 0, self._epochs[t] + 1
            c = self._cursors[t]
            n = min(k, self._sizes[t] - c)
            out.append(self._perm(t)[c : c + n])
            self._cursors[t], k = c + n, k - n
        return np.concatenate(out)

    def __next__(self) -> dict[str, np.ndarray]:
        row_tasks = self._row_tasks(self._step)
        batch = None
        for t in np.unique(row_tasks):
            rows = np.nonzero(row_tasks == t)[0]
            idx = self._take(int(t), len(rows))
            part = self._data[t][idx.tolist()]
            if batch is None:
                seq_len = part["input_ids"].shape[1]
                batch = {k: np.zeros((self.batch_size, seq_len), np.int32) for k in ARRAY_KEYS}
            for k in ARRAY_KEYS:
                batch[k][rows] = part[k]
        self._step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints (JSON-serialisable): everything needed to continue exactly from here."""
        return {
            "step": self._step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "cursors": list(self._cursors),
            "epochs": list(self._epochs),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by `state_dict()` on an iterator over the same data."""
        if int(state["seed"]) != self.seed or int(state["batch_size"]) != self.batch_size:
            raise DataError(
                f"data state was saved with seed={state['seed']}, batch_size={state['batch_size']}; "
                f"this iterator has seed={self.seed}, batch_size={self.batch_size}"
            )
        cursors, epochs = [int(c) for c in state["cursors"]], [int(e) for e in state["epochs"]]
        if len(cursors) != len(self._data) or len(epochs) != len(self._data):
            raise DataError(f"data state has {len(cursors)} tasks, this iterator {len(self._data)}")
        for t, c in enumerate(cursors):
            if not 0 <= c <= self._sizes[t]:
                raise DataError(f"data state cursor {c} out of range for task {t} of size {self._sizes[t]}")
        self._step, self._cursors, self._epochs = int(state["step"]), cursors, epochs


def eval_batches(task_datasets, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, as fixed-shape batches [B, S], the tasks taken in turn.

    Example i of every task comes before example i + 1 of any, so the first batches, which an
    eval capped at a number of batches reads, hold every task in equal shares until the smallest
    is used up. The last batch is filled with padding rows (all masks 0) so a jitted step sees one
    shape.
    """
    data = _as_task_list(task_datasets)
    task = np.concatenate([np.full(len(ds), t) for t, ds in enumerate(data)])
    row = np.concatenate([np.arange(len(ds)) for ds in data])
    order = np.lexsort((task, row))  # by row, then task
    task, row = task[order], row[order]
    for start in range(0, len(order), batch_size):
        tasks, rows = task[start : start + batch_size], row[start : start + batch_size]
        parts = [data[t][rows[tasks == t].tolist()] for t in np.unique(tasks)]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ARRAY_KEYS}
        n_fill = batch_size - len(rows)
        if n_fill:
            filler = {k: np.repeat(batch[k][:1], n_fill, axis=0) for k in ARRAY_KEYS}
            for k in ("lm_mask", "gate_mask", "attention_mask"):
                filler[k][:] = 0
            batch = {k: np.concatenate([batch[k], filler[k]]) for k in ARRAY_KEYS}
        yield batch


# ----------------------------------------------------------------------------------------------
# Composite-n samples


def build_composite(
    test_sets: Mapping[str, Sequence[Mapping[str, str]]],
    n: int,
    num_samples: int,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Chains n single-task examples from n distinct tasks into one sample.

    Returns records {"prompt": "1. p1\\n2. p2...", "response": "r1@@@@\\nr2...", "tasks": [t1, t2, ...],
    "prompts": [p1, p2, ...]}: sub-prompts numbered one per line, sub-responses joined by
    COMPOSITE_SEPARATOR, in the same order as `tasks`; "prompts" keeps the sub-prompts apart for the
    chained-turns evaluation (`meteora_jax.evaluate`). Deterministic for a given seed and `test_sets`
    (tasks in sorted order).
    """
    tasks = sorted(test_sets)
    if n < 1:
        raise DataError(f"n={n} must be >= 1")
    if n > len(tasks):
        raise DataError(f"composite-{n} needs {n} distinct tasks, only {len(tasks)} given: {tasks}")
    if num_samples < 1:
        raise DataError(f"num_samples={num_samples} must be >= 1")
    # The scorer splits a composite reference at the separator: a response holding it cannot be
    # part of one (each later part would be scored against the wrong task).
    usable = {t: [r for r in test_sets[t] if SEPARATOR_MARK not in r["response"]] for t in tasks}
    for t in tasks:
        if not test_sets[t]:
            raise DataError(f"task {t!r} has an empty test set")
        if not usable[t]:
            raise DataError(f"task {t!r}: every test response holds {SEPARATOR_MARK!r}, the separator of composite answers")
        if len(usable[t]) < len(test_sets[t]):
            warnings.warn(f"task {t!r}: {len(test_sets[t]) - len(usable[t])} test records whose response holds "
                          f"{SEPARATOR_MARK!r} (the separator of composite answers) are left out of composites")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        chosen = [tasks[i] for i in rng.choice(len(tasks), size=n, replace=False)]
        subs = [usable[t][int(rng.integers(len(usable[t])))] for t in chosen]
        samples.append(
            {
                "prompt": "\n".join(f"{i + 1}. {s['prompt']}" for i, s in enumerate(subs)),
                "response": COMPOSITE_SEPARATOR.join(s["response"] for s in subs),
                "tasks": chosen,
                "prompts": [s["prompt"] for s in subs],
            }
        )
    return samples


def read_composite_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads composite records ({"prompt", "response", "tasks": [str, ...]}, optionally "prompts":
    [str, ...], one sub-prompt per task), validated."""

    def check(r):
        if not r["tasks"] or not all(isinstance(t, str) for t in r["tasks"]):
            return "field 'tasks' must be a non-empty list of strings"
        subs = r.get("prompts")
        if subs is not None and (
            not isinstance(subs, list) or len(subs) != len(r["tasks"]) or not all(isinstance(x, str) for x in subs)
        ):
            return f"field 'prompts' must be a list of {len(r['tasks'])} strings (one per task)"
        parts = r["response"].count(SEPARATOR_MARK) + 1
        if parts != len(r["tasks"]):  # a missing part would be scored as "" against its task's answer
            return (f"field 'response' holds {parts} answer(s) separated by {SEPARATOR_MARK!r}, field 'tasks' "
                    f"names {len(r['tasks'])}")
        return None

    return read_jsonl(path, extra_fields={"tasks": list}, check=check)


