"""Real W&B (offline) and TensorBoard logging from a real training run, read back from what they wrote."""

import json
import os

import pytest
from PIL import Image

from pipeline.hub import write_model_card
from tests.conftest import TINY_TRAIN_FLAGS, accelerate_launch, cli_env
from tests.tracking_records import wandb_config, wandb_history, wandb_records

TRAIN_FLAGS = [
    *TINY_TRAIN_FLAGS,
    "--max_train_steps", "4", "--train_batch_size", "8", "--logging_steps", "1", "--validation_steps", "2",
    "--validation_images_per_label", "3",  # overrides the 0 in TINY_TRAIN_FLAGS: metrics on
    "--classifier_train_samples", "3000",
]  # fmt: skip


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, classifier_cache):
    output_dir = tmp_path_factory.mktemp("logged") / "run"
    home = tmp_path_factory.mktemp("home")  # no ~/.netrc: W&B has no login here
    env = cli_env(HOME=str(home))
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    result = accelerate_launch("cpu.yaml", ["--output_dir", str(output_dir), "--report_to", "all",
                                            "--run_name", "tiny-run", "--classifier_cache_dir", classifier_cache,
                                            *TRAIN_FLAGS], env=env)  # fmt: skip
    return output_dir, result.stdout + result.stderr


def test_without_login_wandb_goes_offline_with_a_notice(logged_run):
    output_dir, output = logged_run
    assert "W&B: no login found" in output and "wandb sync" in output
    assert len(list((output_dir / "wandb").glob("offline-run-*"))) == 1


def test_wandb_history_config_and_images(logged_run):
    output_dir, _ = logged_run
    (run_dir,) = (output_dir / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    training_rows = [row for row in rows if "loss" in row]
    assert [row["_step"] for row in training_rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= set(training_rows[0])
    validation_rows = [row for row in rows if "validation/cond_accuracy" in row]
    assert [row["_step"] for row in validation_rows] == [2, 4]  # every --validation_steps and at the end
    assert {"validation/fid", "validation/fid_real_floor"} <= set(validation_rows[0])
    assert any("validation/samples/caption" in row and "one row per class" in row["validation/samples/caption"]
               for row in rows)  # fmt: skip
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == 2
    config = wandb_config(run_dir)
    assert config["learning_rate"] == 0.001 and config["train_batch_size"] == 8


def test_tensorboard_events(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = logged_run
    (event_file,) = (output_dir / "logs" / "class-conditioned-mnist").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"images": 0})
    events.Reload()
    assert {"loss", "lr", "grad_norm", "images_per_s", "validation/cond_accuracy"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [event.step for event in events.Images("validation/samples")] == [2, 4]


def test_run_artifacts_in_the_output_folder(logged_run):
    output_dir, _ = logged_run
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["images_per_s"] > 0
    assert {"cond_accuracy", "fid", "fid_real_floor"} <= set(summary["final_metrics"])
    assert summary["final_metrics"]["num_inference_steps"] == 2 and summary["final_metrics"]["images_per_label"] == 3
    assert Image.open(output_dir / "loss_curve.png").size == (700, 400)
    # The validation grid: 10 rows (classes) x 2 columns of 28 px with 2 px padding, class names at the left.
    width, height = Image.open(output_dir / "samples.png").size
    assert height == 10 * 30 + 2 and 2 * 30 + 2 < width < 2 * 30 + 2 + 30
    card = (output_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "samples.png" in card and "conditional accuracy" in card
    assert "python app.py --model" in card and "Hugging Face Space" in card  # how to run the demo, also as a Space
    assert "the validation reference" in card  # training never reports against the test split
    assert "the local folder `data/mnist`" in card and "`num_epochs`" not in card  # --max_train_steps ran
    assert ("- ddim" in card) == (summary["final_metrics"]["scheduler"] == "DDIMScheduler")
    # The recipe's sampling defaults, which pipe(class_labels) uses, are in the card.
    assert "| `default_guidance_scale` |" in card and "| `default_guidance_interval` | [0.0, 1.0] |" in card


def test_only_the_main_process_logs(tmp_path):
    accelerate_launch("multi_cpu.yaml", ["--output_dir", str(tmp_path), "--report_to", "wandb", *TINY_TRAIN_FLAGS,
                                         "--max_train_steps", "4", "--logging_steps", "1", "--train_batch_size",
                                         "4"])  # fmt: skip
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # one run, not one per process
    assert [row["_step"] for row in wandb_history(run_dir) if "loss" in row] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "samples.png")


def test_wandb_variables_resume_into_the_same_run_and_model_artifact(tmp_path):
    """W&B conventions: WANDB_PROJECT/WANDB_NAME/WANDB_DIR are respected (our defaults used to override them), a
    resumed run continues the W&B run its checkpoint recorded (it used to start a new run per resume), and
    --wandb_log_model logs the saved pipeline as a model artifact (it did not exist)."""
    output_dir = tmp_path / "run"
    flags = ["--output_dir", str(output_dir), "--report_to", "wandb", *TINY_TRAIN_FLAGS, "--train_batch_size", "4",
             "--logging_steps", "1", "--checkpointing_steps", "2"]  # fmt: skip
    env = cli_env(WANDB_PROJECT="project-from-env", WANDB_NAME="name-from-env")
    accelerate_launch("cpu.yaml", [*flags, "--max_train_steps", "2"], env=env)
    (first_dir,) = (output_dir / "wandb").glob("offline-run-*")
    (first_run,) = wandb_records(first_dir, "run")
    assert (first_run.project, first_run.display_name) == ("project-from-env", "name-from-env")

    wandb_dir = tmp_path / "wandb_dir"
    accelerate_launch("cpu.yaml", [*flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                                   "--wandb_log_model"],
                      env={**env, "WANDB_DIR": str(wandb_dir)})  # fmt: skip
    assert len(list((output_dir / "wandb").glob("offline-run-*"))) == 1  # WANDB_DIR wins over OUTPUT_DIR/wandb
    (second_dir,) = (wandb_dir / "wandb").glob("offline-run-*")
    (second_run,) = wandb_records(second_dir, "run")
    assert second_run.run_id == first_run.run_id  # one run, continued
    assert [row["_step"] for row in wandb_history(second_dir) if "loss" in row] == [3, 4]

    (artifact,) = wandb_records(second_dir, "artifact")
    assert (artifact.type, artifact.name) == ("model", f"model-{first_run.run_id}")
    paths = {entry.path for entry in artifact.manifest.contents}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "pipeline_class_conditioned_ddim.py", "README.md"} <= paths  # fmt: skip
    assert not any(path.startswith(("checkpoints/", "logs/", "wandb/")) for path in paths)


def test_the_cards_metrics_sentence_counts_steps(tmp_path):
    # A 1-step student's card said "1 LCMScheduler steps".
    metrics = {"images_per_label": 10, "num_inference_steps": 1, "scheduler": "LCMScheduler", "guidance_scale": 1.0,
               "cond_accuracy": 0.99, "fid": 95.5, "fid_real_floor": 80.0}  # fmt: skip
    for steps, words in ((1, "(1 LCMScheduler step, guidance"), (4, "(4 LCMScheduler steps, guidance")):
        summary = {"global_step": 10, "global_batch_size": 8, "num_processes": 1, "device": "cpu", "wall_time_s": 60,
                   "final_metrics": {**metrics, "num_inference_steps": steps}}  # fmt: skip
        write_model_card(str(tmp_path), {"dataset": "data/mnist"}, summary, {0: "0", 1: "1"}, "LCMScheduler")
        assert words in (tmp_path / "README.md").read_text()
