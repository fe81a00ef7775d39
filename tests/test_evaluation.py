"""The evaluator and its held-out protocol: the classifier never sees the reference or the floor's digits, the floor
is class-balanced like the generated set, seeds give mean and spread, and CAS trains on generated images."""

import json
import sys

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from pipeline.classifier import accuracy, load_fit_and_validation, load_or_train_classifier
from pipeline.data import fit_validation_indices, load_split
from pipeline.evaluate import (
    REAL_FEATURES,
    add_reference_features,
    draw_like,
    evaluate,
    load_evaluation_set,
    score_images,
)
from tests.conftest import DATASET, run_cli

CLASSIFIER_SAMPLES = 3000  # the tests' evaluation classifier learns from the first 3,000 fit images (~20 s, once)


def test_the_train_split_is_cut_into_fit_and_validation_by_class_and_seed():
    train = load_split(DATASET, "train")
    fit, validation, record = fit_validation_indices(train.labels)
    assert len(fit) + len(validation) == len(train) and not set(fit.tolist()) & set(validation.tolist())
    assert 9_990 <= len(validation) <= 10_010 and record["validation_size"] == len(validation)
    # Stratified: every class keeps its share (1/6) to within one image.
    for class_id in range(10):
        in_class = (train.labels == class_id).sum().item()
        assert abs((train.labels[validation] == class_id).sum().item() - in_class / 6) <= 1
    again_fit, again_validation, again_record = fit_validation_indices(train.labels)
    assert torch.equal(fit, again_fit) and torch.equal(validation, again_validation) and record == again_record
    other = fit_validation_indices(train.labels, seed=1)[2]
    assert other["validation_indices_sha256"] != record["validation_indices_sha256"]


def test_classifier_learns_from_fit_only_is_cached_and_records_the_split(classifier_cache):
    first, record = load_or_train_classifier(DATASET, cache_dir=classifier_cache, max_train_samples=CLASSIFIER_SAMPLES)
    second, second_record = load_or_train_classifier(
        DATASET, cache_dir=classifier_cache, max_train_samples=CLASSIFIER_SAMPLES
    )
    assert record == second_record and record["test_accuracy"] > 0.9 and record["validation_accuracy"] > 0.9
    assert record["num_fit_images"] == CLASSIFIER_SAMPLES
    assert record["split"] == fit_validation_indices(load_split(DATASET, "train").labels)[2]
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(first.classify(images), second.classify(images))
    assert accuracy(second, load_split(DATASET, "test")) == record["test_accuracy"]


@pytest.mark.parametrize("reference, floor_source", [("test", "validation"), ("validation", "test")])
def test_floor_comes_from_the_other_held_out_set_with_the_generated_labels(classifier_cache, reference, floor_source):
    evaluation_set = load_evaluation_set(DATASET, reference, classifier_cache, CLASSIFIER_SAMPLES)
    assert evaluation_set.reference_name == reference and evaluation_set.floor_source == floor_source
    fit, validation, _ = load_fit_and_validation(DATASET)
    test = load_split(DATASET, "test")
    expected = {"test": test, "validation": validation}
    assert torch.equal(evaluation_set.reference.labels, expected[reference].labels)
    assert torch.equal(evaluation_set.floor_pool.labels, expected[floor_source].labels)
    # Like a generated set: exactly 7 of every class. The draw has those labels, no repeats, and only pool images.
    labels = torch.arange(10).repeat_interleave(7)
    drawn = draw_like(evaluation_set.floor_pool, labels, seed=0)
    assert torch.equal(drawn.labels, labels)
    pool_images = {bytes(image.numpy()) for image in evaluation_set.floor_pool.images}
    drawn_images = [bytes(image.numpy()) for image in drawn.images]
    assert len(set(drawn_images)) == len(labels) and set(drawn_images) <= pool_images
    assert not set(drawn_images) & {bytes(image.numpy()) for image in fit.images[:CLASSIFIER_SAMPLES]}
    with pytest.raises(ValueError, match="lower --num_images_per_label"):
        draw_like(evaluation_set.floor_pool, torch.zeros(2000, dtype=torch.long), seed=0)


def test_the_reference_features_are_computed_once_and_read_back_exactly(classifier_cache, tmp_path):
    classifier, _ = load_or_train_classifier(DATASET, classifier_cache, max_train_samples=CLASSIFIER_SAMPLES)
    reference = load_split(DATASET, "test").subset(500)
    metrics = []
    for _ in range(2):  # the first computes and caches them, the second reads them
        metrics.append(FrechetInceptionDistance(feature=classifier, reset_real_features=False))
        add_reference_features(metrics[-1], classifier, reference, str(tmp_path))
    assert len(list(tmp_path.glob("fid-reference-*.safetensors"))) == 1
    for name in REAL_FEATURES:
        assert torch.equal(getattr(metrics[0], name), getattr(metrics[1], name))
    generated = torch.rand(50, 1, 28, 28)
    for metric in metrics:
        metric.update(generated, real=False)
    assert metrics[0].compute() == metrics[1].compute()
    # Other reference images (or another classifier) are another key: never the stale statistics.
    add_reference_features(FrechetInceptionDistance(feature=classifier), classifier, reference.subset(499),
                           str(tmp_path))  # fmt: skip
    assert len(list(tmp_path.glob("fid-reference-*.safetensors"))) == 2
    # A cache that cannot be written (here a file where the folder should be) costs the time only.
    (tmp_path / "not_a_folder").write_text("")
    add_reference_features(FrechetInceptionDistance(feature=classifier), classifier, reference.subset(498),
                           str(tmp_path / "not_a_folder"))  # fmt: skip


def test_real_digits_score_near_the_floor_and_noise_far_from_it(classifier_cache):
    evaluation_set = load_evaluation_set(DATASET, "test", classifier_cache, CLASSIFIER_SAMPLES)
    # Real held-out digits that are neither the floor's draw (seed 0) nor in the reference: validation, seed 1.
    labels = torch.arange(10).repeat_interleave(50)
    real = draw_like(evaluation_set.floor_pool, labels, seed=1).images.float() / 255
    real_scores = score_images(real, labels, evaluation_set)
    noise_scores = score_images(torch.rand(500, 1, 28, 28), labels, evaluation_set)
    assert real_scores["cond_accuracy"]["overall"] > 0.85
    assert real_scores["fid"] < 1.5 * real_scores["fid_real_floor"]
    assert noise_scores["fid"] > 10 * real_scores["fid"]
    assert noise_scores["cond_accuracy"]["overall"] < 0.3
    assert set(real_scores["cond_accuracy"]["per_class"]) == {str(i) for i in range(10)}


def test_several_seeds_give_mean_and_spread_of_every_metric(tiny_pipe, classifier_cache):
    unet_batches = []
    tiny_pipe.unet.register_forward_hook(lambda module, args, output: unet_batches.append(args[0].shape[0]))
    results = evaluate(tiny_pipe, DATASET, seeds=(0, 1), num_images_per_label=2, num_inference_steps=2,
                       guidance_scale=2.0, guidance_interval=(0.5, 1.0), classifier_cache_dir=classifier_cache,
                       classifier_train_samples=CLASSIFIER_SAMPLES)  # fmt: skip
    assert unet_batches == [20, 40] * 2  # the sampling settings reach the pipeline: only the 2nd step guided
    assert results["reference"] == "test" and results["floor_source"] == "validation" and results["seeds"] == [0, 1]
    fids = [scores["fid"] for scores in results["per_seed"]]
    assert fids[0] != fids[1]  # the seeds drew different images
    assert results["fid"]["mean"] == pytest.approx(sum(fids) / 2, abs=1e-4)
    assert results["fid"]["std"] == pytest.approx(abs(fids[0] - fids[1]) / 2**0.5, abs=1e-4)
    assert set(results["fid_real_floor"]) == {"mean", "std"} and set(results["cond_accuracy"]["per_class"]) == set(
        map(str, range(10))
    )


def test_evaluate_cli_prints_mean_and_std_and_cas(trained_dir, classifier_cache):
    command = [sys.executable, "-m", "pipeline.evaluate", "--model", str(trained_dir), "--num_images_per_label",
               "3", "--num_inference_steps", "2", "--scheduler", "dpm++", "--seeds", "0", "1", "--cas", "3",
               "--reference", "validation", "--classifier_cache_dir", classifier_cache,
               "--classifier_train_samples", str(CLASSIFIER_SAMPLES), "--guidance_interval", "0", "0.5",
               "--timestep_spacing", "leading"]  # fmt: skip
    output = run_cli(command)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    assert result["scheduler"] == "DPMSolverMultistepScheduler" and result["num_images"] == 30
    assert result["timestep_spacing"] == "leading"  # the flag wins over the folder's saved "trailing"
    assert result["guidance_interval"] == [0.0, 0.5]
    assert result["reference"] == "validation" and result["floor_source"] == "test" and len(result["per_seed"]) == 2
    assert 0 <= result["cond_accuracy"]["mean"] <= 1 and result["fid"]["mean"] > 0
    assert result["fid"]["std"] is not None and result["fid_real_floor"]["mean"] > 0
    cas = result["cas"]
    assert cas["images_per_class"] == 3 and cas["reference"] == "validation"
    assert 0 <= cas["generated"] <= 1 and cas["real"] > 0.3  # 30 real digits already teach a classifier something
    assert "against the validation reference, 2 seed(s)" in output.stderr and "CAS" in output.stderr


def test_evaluation_is_deterministic(tiny_pipe, classifier_cache):
    def run():
        return evaluate(tiny_pipe, DATASET, num_images_per_label=2, num_inference_steps=2, seeds=(3,),
                        classifier_cache_dir=classifier_cache, classifier_train_samples=CLASSIFIER_SAMPLES)  # fmt: skip

    assert run() == run()
