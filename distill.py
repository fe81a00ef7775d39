"""Distil a trained pipeline into a few-step student: `accelerate launch distill.py --teacher DIR --output_dir OUT`.

The student is a `ClassConditionedDDIMPipeline` like its teacher, saved with `LCMScheduler`, 4 steps and no guidance
as its sampling defaults, so `pipe(class_labels=[3, 7])`, `sample.py`, `python -m pipeline.evaluate` and `app.py` use
its few steps with no extra flag. The teacher's guidance is distilled in (pipeline/distillation.py). Every training
flag works as in train_conditional.py (data, optimisation, checkpoints and exact resume, trackers, SIGTERM); the
network, the noise schedule and the classes come from the teacher.
"""

from pipeline.config import parse_distill_args

if __name__ == "__main__":
    from pipeline.distillation import distil

    distil(parse_distill_args())
