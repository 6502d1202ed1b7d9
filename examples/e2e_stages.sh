#!/usr/bin/env bash
# The issue-7 experiment on one GPU, stage by stage: PEFT adapters -> convert -> train the gates ->
# evaluate every system -> results. Every stage skips what is already on disk, so the same command
# run again continues where a run stopped (the GPU machine's runs last at most 10 minutes).
#
#   python examples/make_tasks.py --out data/tasks --seed 0          # once, on any machine
#   GGUF=/root/smol/model.gguf bash examples/e2e_stages.sh [STAGE ...]
#   python examples/write_results.py                                   # docs/results.md
#
# Stages (default: all, in this order):
#   adapters  one PEFT LoRA per task + LoRA-B (examples/train_adapters.py, --time-budget $BUDGET s)
#   convert   base checkpoint; MeteoRA checkpoint of the task adapters; LoRA-B alone as a checkpoint
#   gates     scripts/train.py --config configs/smollm2_135m.py (resumes from its checkpoints)
#   eval      scripts/evaluate.py per system: base zero-shot, LoRA-B, oracle routing, MeteoRA,
#             single tasks and composite-3/5/10 (chained turns), MeteoRA routing pictures
#   hf        examples/baseline_eval.py: the same single-task numbers with transformers + PEFT
#
# Outputs: runs/adapters, runs/smollm2_{base,meteora,lora_b}, runs/smollm2_135m (gates),
# runs/e2e/*.json (results, composite sets, pictures/), runs/e2e/times.jsonl (wall-clock per stage).
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF=${GGUF:-}
BUDGET=${BUDGET:-480}            # seconds of adapter training per call
TASKS=${TASKS:-data/tasks}
RUNS=${RUNS:-runs}               # every output goes under here
OUT=$RUNS/e2e
EVAL_BATCH=${EVAL_BATCH:-64}
COMPOSITE_SAMPLES=${COMPOSITE_SAMPLES:-100}
COMPOSITE_SIZES=${COMPOSITE_SIZES:-3 5 10}
COMPOSITE_T=${COMPOSITE_T:-1}    # routing temperature of composite samples (see docs/results.md)
# Extra arguments per stage, e.g. for a quick CPU dry run:
#   ADAPTER_ARGS="--steps 2 --device cpu" GATE_ARGS="--config.train.steps=4" EVAL_ARGS="--max-samples 2"
# (tests/test_pipeline_e2e.py runs it so on a tiny model, with ADAPTER_ARGS="--base-dir <tiny HF model> ...")
ADAPTER_ARGS=${ADAPTER_ARGS:-}
GATE_ARGS=${GATE_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
HF_ARGS=${HF_ARGS:-}
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(adapters convert gates eval hf)
for s in "${stages[@]}"; do  # every name before any work
  case $s in
    adapters|convert|gates|eval|hf) ;;
    *) echo "unknown stage $s (adapters convert gates eval hf)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(realpath -m "$RUNS/jax_cache")}

device() {
  python - <<'EOF'
import jax
d = jax.devices()[0]
print(f"{d.device_kind} ({d.platform})")
EOF
}
DEVICE=$(device)

# stage NAME CMD...: runs CMD, appends {"stage", "seconds", "device", "status"} to times.jsonl.
stage() {
  local name=$1; shift
  local t0 rc
  t0=$(date +%s.%N)
  echo "=== $name: $*" >&2
  set +e; "$@"; rc=$?; set -e
  python - "$OUT/times.jsonl" "$name" "$t0" "$DEVICE" "$rc" <<'EOF'
import json, sys, time
path, name, t0, device, rc = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"stage": name, "seconds": round(time.time() - float(t0), 1), "device": device,
                        "status": int(rc), "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
EOF
  return "$rc"
}

gguf_flag=()
[[ -n "$GGUF" ]] && gguf_flag=(--gguf "$GGUF")

run_adapters() {
  if [[ -f $RUNS/adapters/adapters.txt && -f $RUNS/adapters/lora_b/adapter_model.safetensors \
        && -f $RUNS/adapters/base/config.json ]]; then return 0; fi
  stage adapters python examples/train_adapters.py --tasks-root "$TASKS" --out $RUNS/adapters --mixed \
    "${gguf_flag[@]}" --time-budget "$BUDGET" $ADAPTER_ARGS
  if [[ ! -f $RUNS/adapters/adapters.txt || ! -f $RUNS/adapters/lora_b/adapter_model.safetensors ]]; then
    echo "adapters: not all trained yet; run the same command again" >&2
    exit 75
  fi
}

run_convert() {
  [[ -d $RUNS/smollm2_base ]] || stage convert_base python scripts/convert.py base $RUNS/adapters/base \
    -o $RUNS/smollm2_base --quiet
  [[ -d $RUNS/smollm2_meteora ]] || stage convert_loras python scripts/convert.py loras --base $RUNS/smollm2_base \
    --adapter-dir $RUNS/adapters -o $RUNS/smollm2_meteora --quiet
  [[ -d $RUNS/smollm2_lora_b ]] || stage convert_lora_b python scripts/convert.py loras --base $RUNS/smollm2_base \
    --adapters lora_b=$RUNS/adapters/lora_b -o $RUNS/smollm2_lora_b --quiet
}

run_gates() {
  [[ -d $RUNS/smollm2_135m/gates ]] || stage gates python scripts/train.py --config configs/smollm2_135m.py \
    --config.model_checkpoint="$RUNS/smollm2_meteora" --config.tokenizer="$RUNS/adapters/base" \
    --config.workdir="$RUNS/smollm2_135m" --config.data.root="$TASKS" --config.logging.progress=False $GATE_ARGS
}

# evaluate NAME ARGS...: scripts/evaluate.py into $OUT/eval_NAME.json unless that exists. The scan
# layer layout: many prompt-length buckets on a 135M model, where compile time dominates.
evaluate() {
  local name=$1; shift
  [[ -f "$OUT/eval_$name.json" ]] && return 0
  stage "eval_$name" python scripts/evaluate.py --tokenizer $RUNS/adapters/base --data-root "$TASKS" \
    --metrics "$TASKS/metrics.json" --batch-size "$EVAL_BATCH" --chat-template yes --dtype float32 --layer-layout scan \
    --output "$OUT/eval_$name.json" $EVAL_ARGS "$@"
}

run_eval() {
  local composites=()
  for n in $COMPOSITE_SIZES; do
    [[ -f "$OUT/composite_$n.jsonl" ]] || python scripts/evaluate.py --data-root "$TASKS" --build-composite "$n" \
      --composite-samples "$COMPOSITE_SAMPLES" --composite-seed 0 --composite-out "$OUT/composite_$n.jsonl" --build-only
    composites+=(--composite "$OUT/composite_$n.jsonl")
  done
  # The gates were trained at temperature 1 and top-k picks the adapters whatever the temperature;
  # it only flattens the top-2 weights (the original used 15/20/30 for composite-3/5/10).
  local temp=(--composite-temperature "$COMPOSITE_T")
  evaluate base --checkpoint $RUNS/smollm2_base
  evaluate lora_b --checkpoint $RUNS/smollm2_lora_b --force-adapter lora_b "${composites[@]}" "${temp[@]}"
  evaluate oracle --checkpoint $RUNS/smollm2_meteora --oracle "${composites[@]}" "${temp[@]}"
  evaluate meteora --checkpoint $RUNS/smollm2_meteora --gates $RUNS/smollm2_135m/gates "${composites[@]}" "${temp[@]}" \
    --routing-pictures "$OUT/pictures"
}

run_hf() {
  [[ -f "$OUT/hf_eval.json" ]] || stage hf_eval python examples/baseline_eval.py --tasks-root "$TASKS" \
    --adapters $RUNS/adapters --base-dir $RUNS/adapters/base --out "$OUT/hf_eval.json" --show 0 $HF_ARGS
}

for s in "${stages[@]}"; do
  "run_$s"
done
echo "=== done: ${stages[*]}" >&2
