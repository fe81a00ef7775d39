"""Autoguidance against classifier-free guidance on one trained run, at equal network evaluations per image.

    python bench/autoguidance.py --model output/mnist-quick --guide_steps 250 500 1000 --scales 1.5 2 3
    python bench/autoguidance.py --model output/mnist-quick --guide_steps 500 --scales 2 --reference test --seeds 0 1 2
    python bench/autoguidance.py --model output/bench/cpu-hour --guide_models output/bench/small-guide --scales 2 3
    python bench/autoguidance.py --model output/bench/cpu-hour --guide_models output/bench/small-guide --scales 2 \
        --save output/bench/cpu-hour-autoguided    # then bench/quality.py --model_dir ... --skip_training --cas 100

A guide is the weak version of the model that Karras et al. 2024 guide with: the run's own model at an earlier step
(--guide_steps: the run must have kept checkpoints, and its EMA weights are used when it kept one), or the network of
another pipeline folder, e.g. a smaller one trained for a few minutes on the same data (--guide_models). Every setting
samples with the run's saved sampler and steps: CFG calls the UNet on a doubled batch per step, autoguidance calls
the UNet and the guide once each, so both cost two network evaluations per image per step. Each setting is scored by
the evaluator (conditional accuracy, FID with its real-data floor, over the seeds) against --reference: choose on
`validation`, report on `test`. One JSON line per setting is appended, with its provenance, to --results; the last
line printed is the best setting's row.
"""

import argparse
import os
import time
from pathlib import Path

from provenance import append_row, run_record

from pipeline import ClassConditionedDDIMPipeline, ClassConditionedUNet
from pipeline.checkpointing import list_checkpoints, pipeline_at_checkpoint
from pipeline.config import DEFAULT_DATASET
from pipeline.evaluate import REFERENCES, evaluate
from pipeline.loading import load_pipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "autoguidance.jsonl"


def checkpoint_guide(model_dir: str, step: int) -> ClassConditionedUNet:
    """The run's model at checkpoint `step`."""
    checkpoint = os.path.join(model_dir, "checkpoints", f"checkpoint-{step}")
    if checkpoint not in list_checkpoints(model_dir):
        raise SystemExit(f"error: {model_dir} has no {checkpoint}; it has {list_checkpoints(model_dir)}")
    return pipeline_at_checkpoint(model_dir, checkpoint).unet


def with_guide(pipe: ClassConditionedDDIMPipeline, guide: ClassConditionedUNet) -> ClassConditionedDDIMPipeline:
    """`pipe` with `guide` as its guide network."""
    guided = ClassConditionedDDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler, guide_unet=guide,
                                          **{key: pipe.config[key] for key in pipe.config
                                             if key.startswith("default_") and key != "default_guidance"})  # fmt: skip
    guided.set_progress_bar_config(disable=True)
    return guided


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A trained pipeline folder that kept its checkpoints.")
    parser.add_argument("--guide_steps", type=int, nargs="+", default=[], help="Checkpoint steps to guide with.")
    parser.add_argument("--guide_models", nargs="+", default=[], help="Pipeline folders whose network guides.")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="Guidance scales to try.")
    parser.add_argument("--no_cfg", action="store_true", help="Skip the classifier-free rows at the same scales.")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="The run's dataset (default: the bundled MNIST).")
    parser.add_argument("--reference", choices=REFERENCES, default="validation", help="Choose on validation.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Sampling seeds (mean and spread).")
    parser.add_argument("--num_images_per_label", type=int, default=100, help="Images per class per seed.")
    parser.add_argument("--name", default=None, help="Name of the rows (default: the model folder's name).")
    parser.add_argument("--results", default=str(RESULTS), help="JSON lines file to append the rows to.")
    parser.add_argument("--save", default=None, metavar="DIR", help="Measure nothing: save the model with the first "
                        "guide and the first scale as its saved defaults into DIR (for bench/quality.py, e.g. CAS).")
    args = parser.parse_args()
    provenance = run_record()  # taken first: the code that ran is the code at the start

    pipe = ClassConditionedDDIMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    guides = [{"guide_step": step, "guide_model": None} for step in args.guide_steps]
    guides += [{"guide_step": None, "guide_model": folder} for folder in args.guide_models]
    if args.save and not guides:
        parser.error("--save needs a guide: pass --guide_steps or --guide_models")
    # One pipeline per guide, built once (loading its weights), shared by its scales.
    guided = [with_guide(pipe, checkpoint_guide(args.model, guide["guide_step"]) if guide["guide_step"] is not None
                             else load_pipeline(guide["guide_model"], device="cpu").unet)
              for guide in (guides[:1] if args.save else guides)]  # fmt: skip
    if args.save:
        guided[0].register_to_config(default_guidance="autoguidance", default_guidance_scale=args.scales[0])
        guided[0].save_pretrained(args.save)
        return
    unguided = {"guide_step": None, "guide_model": None}
    settings = [("cfg", unguided, pipe, scale) for scale in ([] if args.no_cfg else args.scales)]
    settings += [("autoguidance", guide, sampler, scale) for guide, sampler in zip(guides, guided, strict=True)
                 for scale in args.scales]  # fmt: skip
    rows = []
    for guidance, guide, sampler, scale in settings:
        started = time.perf_counter()
        results = evaluate(sampler, args.dataset, reference=args.reference, seeds=tuple(args.seeds),
                           num_images_per_label=args.num_images_per_label, guidance_scale=scale,
                           guidance=guidance)  # fmt: skip
        row = {
            "name": args.name or os.path.basename(os.path.normpath(args.model)),
            "model": args.model,
            "guidance": guidance,
            **guide,
            **sampler.sampling_settings(guidance_scale=scale, guidance=guidance),
            "scheduler": type(sampler.scheduler).__name__,
            "unet_calls_per_image": 2 * sampler.config.default_num_inference_steps,  # both kinds: 2 per step
            "minutes": round((time.perf_counter() - started) / 60, 2),
            **{key: results[key] for key in ("reference", "seeds", "num_images", "cond_accuracy", "fid",
                                             "fid_real_floor")},  # fmt: skip
            "provenance": provenance,
        }
        append_row(args.results, row)
        rows.append(row)
        floor = row["fid_real_floor"]["mean"]
        guide_name = guide["guide_model"] or guide["guide_step"]
        print(f"{guidance:<12} guide {guide_name!s:<6} scale {scale:<4} accuracy {row['cond_accuracy']['mean']:.4f} "
              f"FID {row['fid']['mean']:.2f} ({row['fid']['mean'] / floor:.2f}x the floor)", flush=True)  # fmt: skip
    best = max(rows, key=lambda row: row["cond_accuracy"]["mean"] - row["fid"]["mean"] / row["fid_real_floor"]["mean"])
    print(best)


if __name__ == "__main__":
    main()
