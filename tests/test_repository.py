"""The repository keeps its promises: CI runs the README's test command, and every config parses."""

import json
import sys

from tests.conftest import REPO_ROOT, run_cli


def test_ci_runs_the_readme_test_command():
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    command = ci_lines[ci_lines.index("# README test command:") + 1]
    assert command in (REPO_ROOT / "README.md").read_text()
    assert "pytest" in command


def test_every_accelerate_config_parses_and_says_when_to_use_it():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))
    names = {path.name for path in configs}
    assert names == {
        "cpu.yaml",
        "multi_cpu.yaml",
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "multi_node.yaml",
    }
    for path in configs:
        assert path.read_text().startswith("# "), f"{path.name} lacks its 'when to use' comment"
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path.name
    assert load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "multi_cpu.yaml")).use_cpu


def test_slurm_script_launches_once_per_node():
    script = (REPO_ROOT / "accelerate_configs" / "slurm_multinode.sbatch").read_text()
    assert "--ntasks-per-node=1" in script and "srun" in script and "$SLURM_NODEID" in script
    assert "multi_node.yaml" in script


def test_presets_name_real_flags_and_explicit_flags_win():
    from pipeline import config
    from pipeline.presets import PRESETS

    def resolved(*flags: str) -> dict:  # as --print_config prints them
        return json.loads(json.dumps(vars(config.parse_args(list(flags)))))

    # What a user sees: --print_config in a real process prints the same resolved settings.
    printed = run_cli([sys.executable, "train_conditional.py", "--preset", "quick", "--print_config"]).stdout
    assert json.loads(printed) == {**resolved("--preset", "quick"), "print_config": True}
    plain = resolved()
    # The seed preset is the script's plain defaults: the notebook's recipe.
    assert {key: plain[key] for key in PRESETS["seed"]} == PRESETS["seed"]
    for name, values in PRESETS.items():
        assert set(values) <= set(plain), f"preset {name} sets unknown flags {set(values) - set(plain)}"
        if name != "seed":
            args = resolved("--preset", name, "--learning_rate", "0.5")
            assert {key: args[key] for key in values if key != "learning_rate"} == {
                key: value for key, value in values.items() if key != "learning_rate"
            }
            assert args["learning_rate"] == 0.5  # an explicit flag beats the preset


def test_core_install_does_not_pull_the_demo():
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    assert "gradio" not in config["options"]["install_requires"]
    assert "gradio" in config["options.extras_require"]["demo"]
