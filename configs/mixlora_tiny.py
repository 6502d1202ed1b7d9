"""MixLoRA on the tiny world: 4 LoRA experts in every FFN of a plain tiny LLaMA, a top-2 router and
the load-balancing loss; the CPU demo of MixLoRA training (docs/mixlora.md).

`python scripts/train.py --config configs/mixlora_tiny.py` builds (or finds) a tiny world without
adapters in runs/tiny_world_plain (configs/tiny.py's tokenizer, tasks and model shape, with no
adapters), adds the router and the experts to its model, and trains them on a CPU in a minute or
two. There is no gate loss: the router learns from the LM loss and the balance loss alone.
"""

import importlib.util
import os


def _tiny_config():
    """configs/tiny.py's config (this file's sibling; configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _tiny_config()
    config.model.meteora.num_adapters = 0  # a plain model: MixLoRA alone
    config.model.mixlora.update(num_experts=4, rank=4, alpha=8.0, top_k=2)
    config.tiny_world = "runs/tiny_world_plain"  # (the world's paths follow it)
    config.workdir = "runs/mixlora_tiny"
    config.train.update(router_aux_loss_coef=0.01, lora_dropout=0.05)  # MixLoRA's
    return config
