"""Sampling speed and quality: the seed's 40-step DDIM loop against our pipeline with faster samplers.

    python bench/sampling.py --model output/mnist-quick             # 100 images per class per setting, seeds 0 1 2
    python bench/sampling.py --model output/mnist-quick --quick     # 20 images per class, fewer settings
    python bench/sampling.py --model output/mnist-quick --student output/mnist-quick-lcm --quick  # + a student's steps

The settings: the seed loop, the model's saved default (what `pipe(class_labels)` runs), our samplers, and with
--student a distilled student's 4, 2 and 1 steps. For each setting and each seed it samples, times and scores the
images: images/s, UNet calls per image and the evaluator's conditional accuracy and FID (with the real-data floor),
all on the same trained model and the same machine; each figure is reported as the mean and standard deviation over
the seeds. The seed's loop is written out as in the notebook: `net(x, t, y)` then `scheduler.step(...)` for each of
`DDIMScheduler.set_timesteps(40)`. Classifier-free guidance doubles the batch of each UNet call, not the number of
calls. The run is appended as one JSON line, with its provenance (command, commit, date, machine), to --results,
from which bench/report.py renders README's table; the last line printed is that row.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from provenance import append_row, run_record

from pipeline.evaluate import (
    REFERENCES,
    generate_for_evaluation,
    load_evaluation_set,
    mean_and_std,
    score_images,
    summarize_seeds,
)
from pipeline.loading import load_pipeline
from pipeline.schedulers import set_scheduler

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "sampling.jsonl"
SEED_STEPS = 40  # the notebook's DDIM loop


@torch.no_grad()
def seed_sampling(pipe, num_images_per_label: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's sampling loop on our model (its forward takes the same (x, t, y))."""
    from diffusers import DDIMScheduler

    noise_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise_scheduler.set_timesteps(num_inference_steps=SEED_STEPS)
    num_classes = pipe.unet.config.num_classes
    y = torch.arange(num_classes).repeat_interleave(num_images_per_label)
    x = torch.randn(len(y), 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    for t in noise_scheduler.timesteps:
        residual = pipe.unet(x, t, y).sample
        x = noise_scheduler.step(residual, t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2, y


def measure(sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]], seeds: list[int], evaluation_set) -> dict:
    """Sample with each seed (timed), score each sample set, and summarise every figure over the seeds."""
    img_s, per_seed = [], []
    for seed in seeds:
        started = time.perf_counter()
        images, labels = sample(seed)
        img_s.append(len(images) / (time.perf_counter() - started))
        per_seed.append(score_images(images, labels, evaluation_set, seed=seed))
    # The evaluator's own summary, so these figures are computed exactly as bench/quality.py's.
    return {"img_s": mean_and_std(img_s), **summarize_seeds(per_seed), "num_images": len(images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A trained pipeline folder.")
    parser.add_argument("--name", default=None, help="Name of the row (default: quick or full, after --quick).")
    parser.add_argument("--quick", action="store_true", help="20 images per class and the main settings only.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds to sample and score with.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Guidance for our settings (default: 1, and 2 too if the model learned the null class).",
    )
    parser.add_argument("--dataset", default=str(REPO_ROOT / "data" / "mnist"), help="Classifier and real images.")
    parser.add_argument(
        "--reference", choices=REFERENCES, default="test", help="The held-out images FID compares with."
    )
    parser.add_argument("--student", default=None, help="A distilled student of --model: its 4, 2 and 1 steps too.")
    parser.add_argument("--results", default=str(RESULTS), help="JSON-lines file to append to.")
    args = parser.parse_args()
    num_images_per_label = 20 if args.quick else 100

    provenance = run_record()  # taken first: the code measured is the code at the start of the run
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    evaluation_set = load_evaluation_set(args.dataset, reference=args.reference)

    guidance_scales = [args.guidance_scale] if args.guidance_scale else [1.0]
    if args.guidance_scale is None and pipe.unet.config.class_dropout_prob:
        guidance_scales.append(2.0)
    settings = [("dpm++", 10), ("unipc", 10)] if args.quick else [
        ("ddim", 50), ("ddim", 20), ("dpm++", 20), ("dpm++", 10), ("unipc", 10), ("dpm++", 5)]  # fmt: skip

    def seed_loop(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return seed_sampling(pipe, num_images_per_label, seed)

    rows = [{"setting": f"seed loop: ddim {SEED_STEPS} steps", "sampler": "ddim", "num_inference_steps": SEED_STEPS,
             "unet_calls_per_image": SEED_STEPS, "guidance_scale": 1.0,
             **measure(seed_loop, args.seeds, evaluation_set)}]  # fmt: skip

    def saved_default(seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # the model as `pipe(class_labels)` samples
        return generate_for_evaluation(pipe, num_images_per_label, seed=seed)

    saved = pipe.sampling_settings()  # what `pipe(class_labels)` samples with
    steps, guidance_scale = saved["num_inference_steps"], saved["guidance_scale"]
    rows.append({"setting": f"saved default: {type(pipe.scheduler).__name__} {steps} steps", "sampler": "saved",
                 "num_inference_steps": steps, "unet_calls_per_image": steps, "guidance_scale": guidance_scale,
                 **measure(saved_default, args.seeds, evaluation_set)})  # fmt: skip
    for sampler, steps in settings:
        set_scheduler(pipe, sampler)
        for guidance_scale in guidance_scales:

            def ours(seed: int, steps: int = steps, guidance_scale: float = guidance_scale):
                return generate_for_evaluation(pipe, num_images_per_label, steps, guidance_scale, seed=seed)

            rows.append({"setting": f"{sampler} {steps} steps", "sampler": sampler, "num_inference_steps": steps,
                         "unet_calls_per_image": steps, "guidance_scale": guidance_scale,
                         **measure(ours, args.seeds, evaluation_set)})  # fmt: skip
    if args.student:  # a student of distill.py: its own few steps, unguided (the teacher's guidance is built in)
        student = load_pipeline(args.student, device="cpu")
        student.set_progress_bar_config(disable=True)
        for steps in (4, 2, 1):

            def distilled(seed: int, steps: int = steps):
                return generate_for_evaluation(student, num_images_per_label, steps, 1.0, seed=seed)

            name = f"student {type(student.scheduler).__name__} {steps} step{'s' * (steps > 1)}"
            rows.append({"setting": name, "sampler": "student",
                         "num_inference_steps": steps, "unet_calls_per_image": steps, "guidance_scale": 1.0,
                         **measure(distilled, args.seeds, evaluation_set)})  # fmt: skip
    for row in rows:
        print(f"{row['setting']:<26} guidance {row['guidance_scale']:<4} {row['img_s']['mean']:7.1f} img/s  "
              f"calls/image {row['unet_calls_per_image']:>3}  accuracy {row['cond_accuracy']['mean']:.3f}  "
              f"FID {row['fid']['mean']:7.2f} (floor {row['fid_real_floor']['mean']:.2f})")  # fmt: skip

    # "Same quality": mean accuracy within half a point and mean FID within 5% of the seed loop's (or better).
    seed_row = rows[0]
    matching = [row for row in rows[1:]
                if row["cond_accuracy"]["mean"] >= seed_row["cond_accuracy"]["mean"] - 0.005
                and row["fid"]["mean"] <= seed_row["fid"]["mean"] * 1.05]  # fmt: skip
    best = min(matching, key=lambda row: (row["unet_calls_per_image"], -row["img_s"]["mean"])) if matching else None
    result = {
        "name": args.name or ("quick" if args.quick else "full"),
        "provenance": provenance,
        "model": args.model,
        "student": args.student,
        "reference": evaluation_set.reference_name,
        "floor_source": evaluation_set.floor_source,
        "seeds": args.seeds,
        "num_images_per_label": num_images_per_label,
        "settings": rows,
        "fewest_calls_at_seed_quality": best and {
            "setting": best["setting"],
            "guidance_scale": best["guidance_scale"],
            "call_ratio_vs_seed": round(best["unet_calls_per_image"] / SEED_STEPS, 3),
            "speedup_vs_seed": round(best["img_s"]["mean"] / seed_row["img_s"]["mean"], 2),
        },
    }  # fmt: skip
    append_row(args.results, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
