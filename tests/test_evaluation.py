"""The evaluator: its classifier is real and cached, and its metrics separate real digits from noise."""

import json
import sys

import torch

from pipeline.classifier import accuracy, load_or_train_classifier
from pipeline.data import load_split
from pipeline.evaluate import evaluate, score_images
from tests.conftest import DATASET, run_cli


def test_classifier_is_trained_once_then_loaded(classifier_cache):
    first, record = load_or_train_classifier(DATASET, cache_dir=classifier_cache, max_train_samples=3000)
    second, second_record = load_or_train_classifier(DATASET, cache_dir=classifier_cache, max_train_samples=3000)
    assert record == second_record and record["test_accuracy"] > 0.9  # 3,000 training images, 3 epochs
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(first.classify(images), second.classify(images))
    test = load_split(DATASET, "test")
    assert accuracy(second, test) == record["test_accuracy"]


def test_real_digits_score_near_the_floor_and_noise_far_from_it(classifier_cache):
    classifier, _ = load_or_train_classifier(DATASET, cache_dir=classifier_cache, max_train_samples=3000)
    test, train = load_split(DATASET, "test"), load_split(DATASET, "train")
    # Another random draw of real digits than the floor's (a consecutive block would come from fewer writers).
    indices = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:500]
    real = train.images[indices].float() / 255
    real_scores = score_images(real, train.labels[indices], classifier, test, train)
    noise_scores = score_images(torch.rand(500, 1, 28, 28), train.labels[indices], classifier, test, train)
    assert real_scores["cond_accuracy"]["overall"] > 0.85
    assert real_scores["fid"] < 2 * real_scores["fid_real_floor"]
    assert noise_scores["fid"] > 10 * real_scores["fid"]
    assert noise_scores["cond_accuracy"]["overall"] < 0.3
    assert set(real_scores["cond_accuracy"]["per_class"]) == {str(i) for i in range(10)}


def test_evaluate_cli_prints_one_json_object(trained_dir, classifier_cache):
    command = [sys.executable, "-m", "pipeline.evaluate", "--model", str(trained_dir), "--num_images_per_label",
               "3", "--num_inference_steps", "2", "--scheduler", "dpm++", "--classifier_cache_dir",
               classifier_cache, "--classifier_train_samples", "3000"]  # fmt: skip
    result = json.loads(run_cli(command).stdout.strip().splitlines()[-1])
    assert result["scheduler"] == "DPMSolverMultistepScheduler" and result["num_images"] == 30
    assert 0 <= result["cond_accuracy"]["overall"] <= 1 and result["fid"] > 0 and result["fid_real_floor"] > 0


def test_evaluation_is_deterministic(tiny_pipe, classifier_cache):
    def run():
        return evaluate(tiny_pipe, DATASET, num_images_per_label=2, num_inference_steps=2, seed=3,
                        classifier_cache_dir=classifier_cache, classifier_train_samples=3000)  # fmt: skip

    assert run() == run()
