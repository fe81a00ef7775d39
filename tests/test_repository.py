"""The repository keeps its promises: CI runs the README's test command, and every config parses."""

from tests.conftest import REPO_ROOT


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
        "fsdp.yaml",
        "deepspeed_zero2.yaml",
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
