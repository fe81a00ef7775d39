"""Training learns: the `smoke` preset, trained for two minutes or so on the real bundled MNIST, lowers its loss and
draws the digits it is asked for, as the evaluation classifier judges them, with every sampler.
`pytest -k learns` runs just this.

The thresholds come from `python bench/learning.py --seeds 0 1 2` (rows in bench/results/learning.jsonl): they sit
well below the worst seed measured there and at 2x chance (10 %): within the test's few minutes on 2 cores the
model does not get far enough for a bar of 3x chance with a margin. A model whose class input is cut, or one
trained on shuffled labels, scores near chance and fails them.
"""

import json
from pathlib import Path

import pytest

from pipeline import ClassConditionedDDIMPipeline
from pipeline.evaluate import evaluate
from pipeline.schedulers import SCHEDULERS, set_scheduler
from tests.conftest import DATASET, accelerate_launch

MIN_COND_ACCURACY = 0.2  # the final validation of training: 20 images per class, DPM-Solver++ 10 steps, guidance 3
MAX_LOSS_RATIO = 0.5  # last logging window's loss over the first one's
MIN_SAMPLER_ACCURACY = 0.2  # each sampler at 10 steps, 10 images per class, the saved guidance


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory, classifier_cache) -> Path:
    output_dir = tmp_path_factory.mktemp("learning") / "run"
    accelerate_launch(
        "cpu.yaml",
        ["--output_dir", str(output_dir), "--preset", "smoke", "--classifier_cache_dir", classifier_cache,
         "--classifier_train_samples", "3000"],  # fmt: skip
    )
    return output_dir


def test_training_learns_the_requested_digits(learned_dir):
    summary = json.loads((learned_dir / "training_summary.json").read_text())
    losses = [loss for _, loss in summary["loss_history"]]
    assert losses[-1] < MAX_LOSS_RATIO * losses[0], f"the loss did not fall: {losses}"
    metrics = summary["final_metrics"]
    assert metrics["reference"] == "validation"  # training never scores the model against the test split
    assert metrics["cond_accuracy"] >= MIN_COND_ACCURACY, metrics


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_sampler_learns_to_draw_the_requested_digits(learned_dir, classifier_cache, scheduler):
    """A swapped scheduler must give images of the requested class, not only finite values."""
    pipe = ClassConditionedDDIMPipeline.from_pretrained(learned_dir)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    results = evaluate(pipe, DATASET, reference="validation", num_images_per_label=10, num_inference_steps=10,
                       classifier_cache_dir=classifier_cache, classifier_train_samples=3000)  # fmt: skip
    assert results["cond_accuracy"]["mean"] >= MIN_SAMPLER_ACCURACY, (scheduler, results["cond_accuracy"])
