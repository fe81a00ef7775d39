"""Train a class-conditioned diffusion model on MNIST and save it as a `ClassConditionedDDIMPipeline`.

The same unchanged script runs on a CPU, one GPU, several GPUs or several machines; `accelerate launch` decides:

    # CPU, one process (a few minutes with a small model)
    accelerate launch --config_file accelerate_configs/cpu.yaml train_conditional.py \\
        --output_dir output/mnist --max_train_steps 300 --train_batch_size 64

    # the seed's recipe on one GPU: batch 512, Adam 1e-3, 10 epochs
    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_conditional.py --output_dir output/seed

    # any Hub dataset in the `ylecun/mnist` layout goes through the very same code
    accelerate launch train_conditional.py --dataset ylecun/mnist --output_dir output/hub

Then sample: `python sample.py --model output/mnist --output grid.png`.
"""

from pipeline.config import parse_args

if __name__ == "__main__":
    from pipeline.training import run

    run(parse_args())
