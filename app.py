"""The web demo of a trained pipeline: `pip install -e ".[demo]"`, then `python app.py --model output/mnist-quick`
and open http://127.0.0.1:7860. Every flag: `python app.py --help` (the demo lives in pipeline/demo.py).
"""

from pipeline.demo import cli

if __name__ == "__main__":
    cli()
