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
from pipeline.evaluate import EvaluationSet, generate_for_evaluation, load_evaluation_set, score_images
from pipeline.schedulers import SCHEDULERS, set_scheduler
from tests.conftest import DATASET, train_here

MIN_COND_ACCURACY = 0.2  # the final validation of training: 20 images per class, DPM-Solver++ 10 steps, guidance 3
MAX_LOSS_RATIO = 0.5  # last logging window's loss over the first one's
MIN_SAMPLER_ACCURACY = 0.2  # each sampler at 10 steps, 10 images per class, the saved guidance


@pytest.fixture(scope="module")
def learned_dir(tmp_path_factory, classifier_cache) -> Path:
    output_dir = tmp_path_factory.mktemp("learning") / "run"
    train_here(["--output_dir", str(output_dir), "--preset", "smoke", "--classifier_cache_dir", classifier_cache,
                "--classifier_train_samples", "3000"])  # fmt: skip
    return output_dir


def test_training_learns_the_requested_digits(learned_dir):
    summary = json.loads((learned_dir / "training_summary.json").read_text())
    losses = [loss for _, loss in summary["loss_history"]]
    assert losses[-1] < MAX_LOSS_RATIO * losses[0], f"the loss did not fall: {losses}"
    metrics = summary["final_metrics"]
    assert metrics["reference"] == "validation"  # training never scores the model against the test split
    assert metrics["cond_accuracy"] >= MIN_COND_ACCURACY, metrics


@pytest.fixture(scope="module")
def learned_pipe(learned_dir) -> ClassConditionedDDIMPipeline:
    pipe = ClassConditionedDDIMPipeline.from_pretrained(learned_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def validation_set(classifier_cache) -> EvaluationSet:
    """Read once for all samplers: `evaluate()` would load the classifier and the real images for each."""
    return load_evaluation_set(DATASET, "validation", classifier_cache, classifier_train_samples=3000)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_sampler_learns_to_draw_the_requested_digits(learned_pipe, validation_set, scheduler):
    """A swapped scheduler must give images of the requested class, not only finite values. Each sampler is built
    from the saved scheduler (as `sample.py --scheduler` does), scored as `evaluate()` scores its first seed."""
    saved_scheduler = learned_pipe.scheduler
    set_scheduler(learned_pipe, scheduler)
    try:
        images, labels = generate_for_evaluation(learned_pipe, num_images_per_label=10, num_inference_steps=10)
    finally:
        learned_pipe.scheduler = saved_scheduler
    accuracy = score_images(images, labels, validation_set)["cond_accuracy"]
    assert accuracy["overall"] >= MIN_SAMPLER_ACCURACY, (scheduler, accuracy)
