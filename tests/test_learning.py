"""Training learns: a small model trained for about a minute on the real bundled MNIST draws the digits it is asked
for, as judged by the evaluation classifier, with every sampler. `pytest -k learns` runs just this.

The threshold comes from measured runs (README "Evaluation", the learning test): the worst of the calibration
seeds cleared it by a wide margin, and it is well above chance (10 %). A model whose class input is cut or whose
labels are shuffled scores near chance and fails.
"""

import json
from pathlib import Path

import pytest

from pipeline import ClassConditionedDDIMPipeline
from pipeline.evaluate import evaluate
from pipeline.schedulers import SCHEDULERS, set_scheduler
from tests.conftest import DATASET, accelerate_launch

# The recipe: the `quick` preset's levers on a two-level model, 150 steps of 64 images (about a minute on 2 cores).
LEARNING_FLAGS = [
    "--block_out_channels", "16", "32",
    "--down_block_types", "DownBlock2D", "AttnDownBlock2D",
    "--up_block_types", "AttnUpBlock2D", "UpBlock2D",
    "--layers_per_block", "1", "--norm_num_groups", "8", "--time_class_embedding",
    "--train_batch_size", "64", "--max_train_steps", "150", "--learning_rate", "2e-3",
    "--lr_scheduler", "cosine", "--lr_warmup_steps", "20",
    "--beta_schedule", "squaredcos_cap_v2", "--snr_gamma", "5", "--class_dropout_prob", "0.1",
    "--default_scheduler", "dpm++", "--default_num_inference_steps", "10", "--default_guidance_scale", "2",
    "--logging_steps", "10", "--validation_images_per_label", "20", "--validation_grid_columns", "4",
]  # fmt: skip
MIN_COND_ACCURACY = 0.5  # calibration (seeds 0, 1, 2): see the module docstring
MIN_SCHEDULER_ACCURACY = 0.4  # other samplers at 10 steps, one seed of 10 images per class


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory, classifier_cache) -> Path:
    output_dir = tmp_path_factory.mktemp("learning") / "run"
    accelerate_launch(
        "cpu.yaml",
        ["--output_dir", str(output_dir), *LEARNING_FLAGS, "--classifier_cache_dir", classifier_cache,
         "--classifier_train_samples", "3000"],  # fmt: skip
    )
    return output_dir


def test_training_learns_the_requested_digits(learned_dir):
    summary = json.loads((learned_dir / "training_summary.json").read_text())
    losses = [loss for _, loss in summary["loss_history"]]
    assert losses[-1] < 0.7 * losses[0], f"the loss did not fall: {losses}"
    metrics = summary["final_metrics"]
    assert metrics["reference"] == "validation"  # training never looks at the test split
    assert metrics["cond_accuracy"] >= MIN_COND_ACCURACY, metrics


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_sampler_learns_to_draw_the_requested_digits(learned_dir, classifier_cache, scheduler):
    """A swapped scheduler must give images of the requested class, not only finite values."""
    pipe = ClassConditionedDDIMPipeline.from_pretrained(learned_dir)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    results = evaluate(pipe, DATASET, reference="validation", num_images_per_label=10, num_inference_steps=10,
                       classifier_cache_dir=classifier_cache, classifier_train_samples=3000)  # fmt: skip
    assert results["cond_accuracy"]["mean"] >= MIN_SCHEDULER_ACCURACY, (scheduler, results["cond_accuracy"])
