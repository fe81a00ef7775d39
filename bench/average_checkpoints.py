"""Average the weights of several checkpoints of one run into a new pipeline folder: an EMA longer than the run kept,
chosen after training.

    python bench/average_checkpoints.py --model_dir output/bench/cpu-hour --steps 3000 3500 4000 \
        --to output/bench/cpu-hour-average-3000-4000
    python bench/quality.py --name cpu-hour-average-3000-4000 --model_dir output/bench/cpu-hour-average-3000-4000 \
        --skip_training --reference validation --eval dpm++:20:1.75

Each checkpoint holds the run's EMA weights at its step (the raw weights when the run kept no EMA; `--raw` takes the
raw ones anyway). Their plain mean is the run's EMA smoothed once more over the span of the steps, a coarse form of
the post-hoc EMA of Karras et al. 2024 (EDM2, https://arxiv.org/abs/2312.02696), who choose the averaging length
after training from stored snapshots. The folder is the run's pipeline (its scheduler and sampling defaults) with the
averaged weights, plus `averaging.json`: this command, commit, date and machine, the source and the steps.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from provenance import run_record
from safetensors.torch import load_file

from pipeline.checkpointing import list_checkpoints, pipeline_at_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="A finished run that kept its checkpoints.")
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="The checkpoint steps to average.")
    parser.add_argument("--raw", action="store_true", help="Average the raw weights, not the EMA's.")
    parser.add_argument("--to", required=True, help="A new folder for the averaged pipeline.")
    args = parser.parse_args()
    record = run_record()
    if os.path.exists(args.to):
        raise SystemExit(f"error: {args.to} exists; pass a new folder to --to")
    checkpoints = [os.path.join(args.model_dir, "checkpoints", f"checkpoint-{step}") for step in args.steps]
    missing = [path for path in checkpoints if path not in list_checkpoints(args.model_dir)]
    if missing:
        raise SystemExit(f"error: {args.model_dir} lacks {missing}; it has {list_checkpoints(args.model_dir)}")

    pipe = pipeline_at_checkpoint(args.model_dir, checkpoints[0])
    if args.raw:  # pipeline_at_checkpoint took the EMA's weights; the raw ones are model.safetensors
        states = [load_file(os.path.join(path, "model.safetensors")) for path in checkpoints]
        states = [{name.removeprefix("_orig_mod."): tensor for name, tensor in state.items()} for state in states]
    else:
        states = [pipe.unet.state_dict()]  # the first checkpoint's EMA, loaded above
        states += [pipeline_at_checkpoint(args.model_dir, path).unet.state_dict() for path in checkpoints[1:]]
    pipe.unet.load_state_dict({name: torch.stack([state[name].float() for state in states]).mean(0)
                               for name in states[0]})  # fmt: skip
    pipe.save_pretrained(args.to)
    source = {"provenance": record, "model_dir": args.model_dir, "steps": args.steps, "raw": args.raw}
    Path(args.to, "averaging.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"wrote {args.to}: the mean of {len(checkpoints)} checkpoints' {'raw' if args.raw else 'EMA'} weights")


if __name__ == "__main__":
    main()
