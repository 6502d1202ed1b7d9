r"""Generate text with a meteora-jax checkpoint (greedy by default).

    python scripts/generate.py --checkpoint runs/tiny_world/model --tokenizer runs/tiny_world/tokenizer \
        --gates runs/tiny/gates --prompt "417+26=" --prompt "reverse lamp dog"
    python scripts/generate.py --checkpoint CKPT --tokenizer TOK --prompts-file prompts.txt \
        --max-new-tokens 128 --temperature 0.7 --top-p 0.9 --routing-temperature 15 --json out.jsonl
    python scripts/generate.py ... --force-adapter arith          # one adapter, PEFT-style
    python scripts/generate.py ... --routing-pictures pics/       # PNG + HTML per prompt

--prompts-file: one prompt per line, or a JSONL file whose lines hold {"prompt": ...}. The chat
template follows the training run recorded with --gates (data.chat_template); without gates it is used
when the tokenizer has one (--chat-template auto/yes/no to choose). With --gates, top_k and the compute
dtype are also the training run's (--top-k / --dtype override).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _read_prompts(args) -> list[str]:
    """--prompt values, then --prompts-file's; a bad file raises `DataError` naming it (and the line)."""
    from meteora_jax.data import read_jsonl, read_text_lines

    prompts = list(args.prompt or [])
    path = args.prompts_file
    if path and path.lower().endswith(".jsonl"):
        prompts += [r["prompt"] for r in read_jsonl(path, fields={"prompt": str})]
    elif path:
        prompts += [line.replace("\\n", "\n") for line in read_text_lines(path) if line.strip()]
    return prompts


def _check_outputs(parser, args) -> None:
    """Output paths, checked before any work (a bad one would otherwise fail after all of it)."""
    from meteora_jax.cli import check_outputs_apart, check_writable

    if args.json:
        check_writable(parser, "--json", args.json)
    if args.routing_pictures:
        check_writable(parser, "--routing-pictures", args.routing_pictures, folder=True)
    # (--json over the prompts file replaced the prompts with the answers; --json in the pictures'
    # folder failed at the first picture, after generating.)
    check_outputs_apart(parser, [("--json", args.json), ("--routing-pictures", args.routing_pictures)],
                        [("--prompts-file", args.prompts_file if args.prompts_file and os.path.isfile(args.prompts_file)
                          else None), ("--checkpoint", args.checkpoint),
                         ("--gates", args.gates), ("--tokenizer", args.tokenizer)],
                        output_folders={"--routing-pictures"})


def main(argv=None) -> int:
    from meteora_jax.cli import cli_fail
    from meteora_jax.generate import add_inference_arguments, check_sampling_options

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model checkpoint folder (meteora_jax.checkpoint)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder, or a .gguf file")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None,
                   help="a .jsonl file whose lines hold {'prompt': ...}, or a text file of one prompt per line "
                   "(where a literal \\n stands for a line break)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 <= seed < 2**32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--routing-temperature", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write {prompt, output} lines to this JSONL file")
    p.add_argument("--routing-pictures", default=None,
                   help="folder for PNG + HTML routing pictures per prompt: prompt_NNN of the adapters, "
                   "prompt_NNN_experts of MixLoRA's experts (an earlier run's further ones are removed)")
    add_inference_arguments(p)
    args = p.parse_args(argv)

    # Every input is checked before the model loads; outputs are written only once all prompts are done.
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        if not 0 <= args.seed < 2**32:
            raise ValueError(f"--seed {args.seed} must be in [0, 2**32)")
        check_sampling_options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               routing_temperature=args.routing_temperature)
        _check_outputs(p, args)
        prompts = _read_prompts(args)
    except ValueError as e:
        cli_fail(p, str(e))
    if not prompts:
        cli_fail(p, f"--prompts-file {args.prompts_file} holds no prompt" if args.prompts_file
                 else "give --prompt and/or --prompts-file")

    import jax

    from meteora_jax import viz
    from meteora_jax.data import write_jsonl
    from meteora_jax.generate import encode_prompt, generator_from_args

    try:
        generator, tokenizer, names, opts = generator_from_args(args)
        force, chat = opts.force_adapter, opts.chat_template
        prompt_ids = [encode_prompt(tokenizer, q, chat_template=chat) for q in prompts]
        generator.check_prompts(prompt_ids, args.max_new_tokens)  # all of them, before the first batch
        experts = generator.config.mixlora.num_experts
        if args.routing_pictures and not (generator.config.meteora.num_adapters or experts):
            raise ValueError(f"--routing-pictures: the model in {args.checkpoint} has no adapters or MixLoRA experts "
                             "to route to")
    except ValueError as e:
        cli_fail(p, str(e))
    pictures = bool(args.routing_pictures)

    records, routed = [], []  # routed: (prompt number, token pieces, routing, expert routing, prompt length)
    for start in range(0, len(prompts), args.batch_size):
        chunk, ids = prompts[start : start + args.batch_size], prompt_ids[start : start + args.batch_size]
        out = generator.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=jax.random.fold_in(jax.random.key(args.seed), start),  # --seed 1 shares no batch key with --seed 0
            routing_temperature=args.routing_temperature,
            force_adapter=force,
            return_routing=pictures,
        )
        for j, (q, seq) in enumerate(zip(chunk, out.sequences())):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            records.append({"prompt": q, "output": text})
            print(f"### prompt {start + j}\n{q}\n### output\n{text}\n", flush=True)
            if pictures:
                full = ids[j] + [int(t) for t in out.tokens[j, : out.lengths[j]]]
                experts_j = out.expert_routing[j] if out.expert_routing else None
                adapters_j = out.routing[j] if out.routing else None
                routed.append((start + j, viz.token_pieces(tokenizer, full), adapters_j, experts_j, len(ids[j])))
    if args.json:
        write_jsonl(args.json, records)  # whole or not at all
    # Forced routing: every token used that adapter; the pictures show what the gates would pick.
    title = None if force is None else f"forced to {names[force]}; colours: the gates' own top-1 choices (unused)"
    for number, pieces, routing, expert_routing, prompt_length in routed:
        viz.save_routing_pictures(os.path.join(args.routing_pictures, f"prompt_{number:03d}"), pieces, routing=routing,
                                  adapter_names=names, expert_routing=expert_routing, num_experts=experts,
                                  prompt_length=prompt_length, title=title)
    if pictures:
        removed = viz.remove_earlier_routing_pictures(args.routing_pictures, "prompt_", len(prompts), adapters=bool(names),
                                                      experts=bool(experts))
        if removed:
            print(f"removed {len(removed)} routing pictures of an earlier run from {args.routing_pictures}", file=sys.stderr)
        stem = os.path.join(args.routing_pictures, "prompt_NNN")
        kinds = ([f"{stem}.png and .html"] if names else []) + ([f"{stem}{viz.EXPERTS_SUFFIX}.png and .html"] if experts else [])
        print(f"routing pictures: {' and '.join(kinds)}, NNN = 000 to {len(prompts) - 1:03d}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
