"""Checkpoints of the original PyTorch MeteoRA implementation -> our stacked adapter layout.

Accepted files: one `.safetensors` file, one torch pickle (`.bin` / `.pt` / `.pth`, a state dict
or `{"state_dict": ...}` / `{"model": ...}` around one), a directory of such files (all
`*.safetensors` in it, else all `*.bin` / `*.pt` / `*.pth`; a key may appear in only one file), or
a torch.distributed.checkpoint folder (`.metadata` + `*.distcp`: what the original's FSDP training
saves, e.g. `checkpoint-5000/pytorch_model_fsdp_0`; only its adapter and gate tensors are read).

Accepted keys, per decoder layer `i` and adapted projection `P` (`self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`), with an optional `base_model.model.` prefix and an optional adapter
name segment before `weight` (`lora_A.default.weight`):

    model.layers.{i}.{P}.lora_A.weight     [L*r, d_in]   rows l*r:(l+1)*r are adapter l's A
    model.layers.{i}.{P}.lora_B.weight     [d_out, L*r]  columns l*r:(l+1)*r are adapter l's B
    model.layers.{i}.{P}.moe_gate.weight   [L, d_in]     row l is adapter l's gate vector

L is the row count of `moe_gate.weight` (the same everywhere; `num_adapters` may assert it), and
the rank of a projection is r = rows(lora_A) / L (the same in every layer; projections may differ,
smaller ranks are zero-padded). A projection is adapted when any layer has these keys, and then
every layer must have all three. Base-model weights in the same file (`model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight`, `*_layernorm.weight`, `{P}.weight`, `{P}.base_layer.weight`)
are skipped: the base comes from its own source. Any other key is an error.

The file holds no alphas: the scaling of every adapter is given (`scaling`, or `lora_alpha` with
`use_rslora`, one value or one per adapter). Gates keep their trained values: `gate = moe_gate.T`
([d_in, L], float32), so routing is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from meteora_jax.config import ALL_PROJECTIONS, MeteoRAConfig, ModelConfig, block_of
from meteora_jax.convert.common import (
    ConversionError,
    check_finite,
    check_float,
    read_tensor_file,
    sha256_file,
)
from meteora_jax.convert.hf_base import projection_shape, tensor_to_numpy

log = logging.getLogger(__name__)

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+?)"
    r"\.(?P<part>lora_A|lora_B|moe_gate)\.(?:[^.]+\.)?weight$"
)
_BASE_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:lm_head\.weight|model\.(?:embed_tokens|norm)\.weight|"
    r"model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj\.(?:base_layer\.)?weight)$"
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _is_dcp(path: Path) -> bool:
    """A torch.distributed.checkpoint folder: its `.metadata` and one `*.distcp` file per rank."""
    return path.is_dir() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))


def reference_files(path: str | os.PathLike) -> list[Path]:
    """The files of a reference checkpoint (for a DCP folder: `.metadata` and the `*.distcp`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConversionError(f"reference checkpoint {path} not found")
    if _is_dcp(path):
        return [path / ".metadata", *sorted(path.glob("*.distcp"))]
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES)
    if not files:
        raise ConversionError(f"reference checkpoint {path}: no *.safetensors, *.bin, *.pt or *.pth files, and not a "
                              "torch.distributed.checkpoint folder (.metadata + *.distcp)")
    return files


def _read_dcp(folder: Path, keep) -> dict[str, np.ndarray]:
    """The kept tensors of a torch.distributed.checkpoint folder, read without a process group.

    Only the kept keys are loaded (the frozen base weights the original saves alongside are never
    read). The state dict may be wrapped in one `model` / `state_dict` entry, as the original's
    FSDP training saves `{"model": ...}`; `planner_data` maps each stored name to its nested path.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    def unreadable(err: BaseException) -> ConversionError:
        # A CheckpointException's text is each rank's whole traceback: name the first rank's error only.
        cause = next((e for e, _ in getattr(err, "failures", {}).values()), err)
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        return ConversionError(f"reference checkpoint {folder}: cannot read the torch.distributed.checkpoint "
                               f"folder ({reason})")

    reader = dcp.FileSystemReader(str(folder))
    try:
        stored = reader.read_metadata()
    except (Exception, CheckpointException) as err:
        raise unreadable(err) from None
    paths = stored.planner_data or {}
    state: dict = {}  # the nested state dict to load into, holding only the kept tensors
    wanted: dict[str, "torch.Tensor"] = {}  # the same tensors by key: dcp.load fills them in place
    for fqn, entry in stored.state_dict_metadata.items():
        path = tuple(paths.get(fqn, (fqn,)))
        key = ".".join(map(str, path[1:] if len(path) > 1 and path[0] in ("model", "state_dict") else path))
        if not keep(key):
            continue
        if not isinstance(entry, TensorStorageMetadata):
            unflattened = key in ("model", "state_dict")  # a whole state dict stored as one pickled object
            raise ConversionError(
                f"reference checkpoint {folder}: entry {key!r} is not a tensor"
                + (" (saved with flatten_state_dict=False: convert the folder with torch's "
                   "torch.distributed.checkpoint.format_utils.dcp_to_torch_save and give the .pt file)"
                   if unflattened else "")
            )
        node = state
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = wanted[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    try:
        with warnings.catch_warnings():  # ("torch.distributed is disabled ...": no_dist is what we ask for)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing rank file, a truncated .distcp
        raise unreadable(err) from None
    return {key: tensor_to_numpy(tensor) for key, tensor in wanted.items()}


def _read_reference(files: Sequence[Path], progress: bool = False) -> dict[str, tuple[Path, np.ndarray]]:
    from tqdm.auto import tqdm

    keep = lambda key: not _BASE_KEY.match(key)  # noqa: E731
    if files and files[0].name == ".metadata":  # a DCP folder: one state dict over all its files
        folder = files[0].parent
        return {key: (folder, value) for key, value in _read_dcp(folder, keep).items()}
    tensors: dict[str, tuple[Path, np.ndarray]] = {}
    for file in tqdm(files, desc="read reference", disable=not progress, leave=False):
        for key, value in read_tensor_file(file, "reference checkpoint", keep=keep).items():
            if key in tensors:
                raise ConversionError(f"reference checkpoint: key {key!r} is in both {tensors[key][0]} and {file}")
            tensors[key] = (file, value)
    return tensors


def _per_adapter(values, num: int, what: str) -> list[float]:
    values = [float(values)] * num if np.ndim(values) == 0 else [float(v) for v in values]
    if len(values) != num:
        raise ConversionError(f"{what}: {len(values)} values given for {num} adapters")
    for value in values:  # a NaN, infinite, zero or negative scaling would be stored as given
        if not (math.isfinite(value) and value > 0):
            raise ConversionError(f"{what}: {value} must be a finite number > 0")
    return values


def load_reference(
    path: str | os.PathLike,
    base_params: dict,
    config: ModelConfig,
    *,
    names: Optional[Sequence[str]] = None,
    num_adapters: Optional[int] = None,
    scaling=None,
    lora_alpha=None,
    use_rslora: bool = False,
    top_k: int = 2,
    progress: bool = True,
) -> tuple[dict, ModelConfig, dict]:
    """Adds a reference MeteoRA checkpoint's adapters and trained gates to base params.

    base_params: numpy tree without adapters; config: the base model's config.
    names: adapter names in index order (default `adapter_0 ... adapter_{L-1}`).
    scaling / lora_alpha (+ use_rslora): exactly one of them, a number or one per adapter.
    Returns `(params, config, metadata)`; metadata lists the adapters and the source files.
    progress: tqdm bars over the files read, the projections stacked and the files hashed.
    """
    from tqdm.auto import tqdm

    from meteora_jax.convert.peft import check_adapter_names

    if (scaling is None) == (lora_alpha is None):
        raise ConversionError("give exactly one of scaling (--scaling) or lora_alpha (--lora-alpha)")
    files = reference_files(path)
    tensors = _read_reference(files, progress)
    parts: dict[str, dict[int, dict[str, tuple[str, Path, np.ndarray]]]] = {}
    for key, (file, value) in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ConversionError(f"reference checkpoint {file}: key {key!r} is not a MeteoRA tensor or base weight")
        layer, projection = int(match["layer"]), match["proj"]
        if projection not in ALL_PROJECTIONS or block_of(projection) != match["block"]:
            raise ConversionError(f"reference checkpoint {file}: key {key!r} names no LLaMA projection")
        if layer >= config.num_layers:
            raise ConversionError(
                f"reference checkpoint {file}: key {key!r} is for layer {layer}, the base has {config.num_layers} layers"
            )
        parts.setdefault(projection, {}).setdefault(layer, {})[match["part"]] = (key, file, value)
    if not parts:
        raise ConversionError(f"reference checkpoint {path}: holds no lora_A / lora_B / moe_gate tensors")

    gate_rows = {v[2].shape[0] for layers in parts.values() for p in layers.values() for k, v in p.items() if k == "moe_gate"}
    if len(gate_rows) > 1:
        raise ConversionError(f"reference checkpoint {path}: moe_gate.weight row counts differ: {sorted(gate_rows)}")
    num = num_adapters if num_adapters is not None else (gate_rows.pop() if gate_rows else 0)
    if num < 1:
        raise ConversionError(f"reference checkpoint {path}: cannot tell the number of adapters (no moe_gate.weight)")
    names = list(names) if names is not None else [f"adapter_{l}" for l in range(num)]
    if len(names) != num:
        raise ConversionError(f"reference checkpoint {path}: {len(names)} adapter names given, it holds {num} adapters")
    check_adapter_names(names)
    if scaling is not None:
        scalings = _per_adapter(scaling, num, "--scaling")
    else:
        alphas = _per_adapter(lora_alpha, num, "--lora-alpha")

    targets = tuple(p for p in ALL_PROJECTIONS if p in parts)
    n = config.num_layers
    ranks = {}
    stacked = {}
    for projection in tqdm(targets, desc="stack adapters", disable=not progress, leave=False):
        d_in, d_out = projection_shape(config, projection)
        for layer in range(n):
            for part in ("lora_A", "lora_B", "moe_gate"):
                if part not in parts[projection].get(layer, {}):
                    name = f"model.layers.{layer}.{block_of(projection)}.{projection}.{part}.weight"
                    raise ConversionError(
                        f"reference checkpoint {path}: key {name!r} is missing ({projection} is adapted in other layers)"
                    )
        a_list, b_list, g_list = [], [], []
        for layer in range(n):
            (key_a, file_a, a), (key_b, file_b, b), (key_g, file_g, g) = (
                parts[projection][layer][p] for p in ("lora_A", "lora_B", "moe_gate")
            )
            if g.shape != (num, d_in):
                raise ConversionError(f"reference checkpoint {file_g}: key {key_g!r} has shape {g.shape}, want {(num, d_in)}")
            if a.ndim != 2 or a.shape[1] != d_in or a.shape[0] % num or a.shape[0] < num:  # r >= 1
                raise ConversionError(
                    f"reference checkpoint {file_a}: key {key_a!r} has shape {a.shape}, want [L*r, {d_in}] with L={num}, r >= 1"
                )
            rank = a.shape[0] // num
            if b.shape != (d_out, num * rank):
                raise ConversionError(
                    f"reference checkpoint {file_b}: key {key_b!r} has shape {b.shape}, want {(d_out, num * rank)} "
                    f"(L={num}, r={rank} from lora_A)"
                )
            if ranks.setdefault(projection, rank) != rank:
                raise ConversionError(
                    f"reference checkpoint {file_a}: key {key_a!r} gives rank {rank}, other layers of {projection} "
                    f"have rank {ranks[projection]}"
                )
            for key, file, value in ((key_a, file_a, a), (key_b, file_b, b), (key_g, file_g, g)):
                check_float(value, f"reference checkpoint {file}", key)
                check_finite(value, f"reference checkpoint {file}", key)
            a_list.append(np.asarray(a, np.float32).reshape(num, rank, d_in).transpose(0, 2, 1))  # [L, d_in, r]
            b_list.append(np.asarray(b, np.float32).reshape(d_out, num, rank).transpose(1, 2, 0))  # [L, r, d_out]
            g_list.append(np.asarray(g, np.float32).T)  # [d_in, L]
        stacked[projection] = (np.stack(a_list), np.stack(b_list), np.stack(g_list))

    rank = max(ranks.values())
    meteora = MeteoRAConfig(
        num_adapters=num, rank=rank, top_k=min(top_k, num), targets=targets, kernel_impl=config.meteora.kernel_impl
    )
    config = config.replace(meteora=meteora)
    params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base_params.items()}
    params["layers"] = {k: dict(v) for k, v in base_params["layers"].items()}
    for block in ("self_attn", "mlp"):
        params["layers"][block] = {k: dict(v) for k, v in base_params["layers"][block].items()}
    adapter_scaling = {}
    for projection, (a, b, g) in stacked.items():
        r = ranks[projection]
        if scaling is not None:
            per_adapter = scalings
        else:
            per_adapter = [alpha / (math.sqrt(r) if use_rslora else r) for alpha in alphas]
        adapter_scaling[projection] = per_adapter
        pad = rank - r
        leaf = params["layers"][block_of(projection)][projection]
        leaf["lora_a"] = np.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad))).astype(config.weight_dtype)
        leaf["lora_b"] = np.pad(b, ((0, 0), (0, 0), (0, pad), (0, 0))).astype(config.weight_dtype)
        leaf["lora_scaling"] = np.broadcast_to(np.asarray(per_adapter, np.float32), (n, num)).copy()
        leaf["gate"] = g

    metadata = {
        "adapters": [
            {
                "name": name,
                "format": "meteora-reference",
                "source": str(Path(path).resolve()),
                "ranks": {p: ranks[p] for p in targets},
                "lora_alpha": None if lora_alpha is None else alphas[l],
                "use_rslora": bool(use_rslora),
                "scaling": {p: adapter_scaling[p][l] for p in targets},
                "target_modules": list(targets),
            }
            for l, name in enumerate(names)
        ],
        "reference": {
            "source": str(Path(path).resolve()),
            "files": [{"path": str(f.resolve()), "sha256": sha256_file(f)}
                      for f in tqdm(files, desc="hash reference files", disable=not progress, leave=False)],
        },
        "gates": "trained (from moe_gate.weight)",
    }
    return params, config, metadata
