"""The training engine: small named components composed by :func:`engine.run.run`.

``train.py`` is the Hydra entry point; everything it needs lives here:

- ``errors``         HarnessError: a one-paragraph message instead of a traceback
- ``distributed``    torchrun/DDP setup and teardown (gloo on CPU, NCCL on GPU)
- ``batching``       global batch in tokens -> micro-batch, accumulation, world size
- ``lr_schedule``    warmup + cosine decay to min_lr
- ``optimizers``     optimizer name -> configured optimizer over the model's parameter groups
- ``hessian``        the Sophia Hessian refresh schedule (GNB or Hutchinson)
- ``metrics``        console, metrics.jsonl and W&B sinks
- ``checkpoint``     atomic, keep-last-N, full-state checkpoints and RNG capture
- ``trainer``        the training step, evaluation and the loop
- ``run``            composition: config -> components -> Trainer.fit()
"""
