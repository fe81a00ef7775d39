"""Sample from a trained pipeline into a PNG grid: `python sample.py --model output/mnist-quick --output grid.png`.

Every flag, with examples: `python sample.py --help` (the command lives in pipeline/sampling.py).
"""

from pipeline.sampling import cli

if __name__ == "__main__":
    cli()
