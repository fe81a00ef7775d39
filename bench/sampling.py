"""Sampling speed and quality: the seed's 40-step DDIM loop against our pipeline with faster samplers.

    python bench/sampling.py --model output/mnist-quick             # 100 images per class per setting
    python bench/sampling.py --model output/mnist-quick --quick     # 20 images per class, fewer settings (~1 min)

For each setting it prints images/s, UNet calls per image and the evaluator's conditional accuracy and FID (with the
real-data floor), all on the same trained model and the same machine. The seed's loop is written out as in the
notebook: `net(x, t, y)` then `scheduler.step(...)` for each of `DDIMScheduler.set_timesteps(40)`. Classifier-free
guidance doubles the batch of each UNet call, not the number of calls. The last line is one JSON object.
"""

import argparse
import json
import time

import torch

from pipeline.classifier import load_or_train_classifier
from pipeline.data import load_split
from pipeline.evaluate import default_dataset, generate_for_evaluation, score_images
from pipeline.loading import load_pipeline
from pipeline.schedulers import set_scheduler


@torch.no_grad()
def seed_sampling(pipe, num_images_per_label: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's sampling loop on our model (its forward takes the same (x, t, y))."""
    from diffusers import DDIMScheduler

    noise_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise_scheduler.set_timesteps(num_inference_steps=40)
    num_classes = pipe.unet.config.num_classes
    y = torch.arange(num_classes).repeat_interleave(num_images_per_label)
    x = torch.randn(len(y), 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    for t in noise_scheduler.timesteps:
        residual = pipe.unet(x, t, y).sample
        x = noise_scheduler.step(residual, t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="A trained pipeline folder.")
    parser.add_argument("--quick", action="store_true", help="20 images per class and the main settings only.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Guidance for our settings (default: 1, and 2 too if the model learned the null class).",
    )
    args = parser.parse_args()
    num_images_per_label = 20 if args.quick else 100

    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    dataset = default_dataset()
    classifier, _ = load_or_train_classifier(dataset)
    test, train = load_split(dataset, "test"), load_split(dataset, "train")

    guidance_scales = [args.guidance_scale] if args.guidance_scale else [1.0]
    if args.guidance_scale is None and pipe.unet.config.class_dropout_prob:
        guidance_scales.append(2.0)
    settings = [("dpm++", 10), ("unipc", 10)] if args.quick else [
        ("ddim", 50), ("ddim", 20), ("dpm++", 20), ("dpm++", 10), ("unipc", 10), ("dpm++", 5)]  # fmt: skip

    rows = []
    started = time.perf_counter()
    images, labels = seed_sampling(pipe, num_images_per_label, seed=0)
    rows.append({"setting": "seed loop: ddim 40 steps", "unet_calls_per_image": 40, "guidance_scale": 1.0,
                 "img_s": len(images) / (time.perf_counter() - started),
                 **score_images(images, labels, classifier, test, train)})  # fmt: skip
    for sampler, steps in settings:
        set_scheduler(pipe, sampler)
        for guidance_scale in guidance_scales:
            started = time.perf_counter()
            images, labels = generate_for_evaluation(pipe, num_images_per_label, steps, guidance_scale, seed=0)
            rows.append({"setting": f"{sampler} {steps} steps", "unet_calls_per_image": steps,
                         "guidance_scale": guidance_scale, "img_s": len(images) / (time.perf_counter() - started),
                         **score_images(images, labels, classifier, test, train)})  # fmt: skip
    for row in rows:
        print(f"{row['setting']:<26} guidance {row['guidance_scale']:<4} {row['img_s']:7.1f} img/s  "
              f"calls/image {row['unet_calls_per_image']:>3}  accuracy {row['cond_accuracy']['overall']:.3f}  "
              f"FID {row['fid']:7.2f} (floor {row['fid_real_floor']:.2f})")  # fmt: skip
    # "Same quality": accuracy within half a point and FID within 5% of the seed loop's (or better).
    seed_row = rows[0]
    matching = [row for row in rows[1:]
                if row["cond_accuracy"]["overall"] >= seed_row["cond_accuracy"]["overall"] - 0.005
                and row["fid"] <= seed_row["fid"] * 1.05]  # fmt: skip
    best = min(matching, key=lambda row: row["unet_calls_per_image"]) if matching else None
    summary = {
        "model": args.model,
        "num_images_per_label": num_images_per_label,
        "rows": [{**row, "cond_accuracy": row["cond_accuracy"]["overall"]} for row in rows],
        "seed_img_s": round(seed_row["img_s"], 2),
        "fewest_calls_at_seed_quality": best and f"{best['setting']}, guidance {best['guidance_scale']}",
        "call_ratio_vs_seed": best and round(best["unet_calls_per_image"] / 40, 3),
        "speedup_at_seed_quality": best and round(best["img_s"] / seed_row["img_s"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
