"""The training engine: small named components composed by :func:`engine.run.run`.

``train.py`` is the Hydra entry point; everything it needs lives here (a map with each module's
contract: docs/architecture.md):

- ``run``            one run: checks, build, resume, the run dir's files, fit, summary
- ``build``          config -> a ready Trainer (``build_trainer``)
- ``trainer``        the training step, evaluation and the loop
- ``optimizers``     optimizer name + config -> optimizer and what the loop needs to know of it
- ``hessian``        the Sophia Hessian refresh schedule (GNB or Hutchinson) and its cost
- ``metrics``        the record of a logged step; console, metrics.jsonl and W&B sinks
- ``checkpoint``     atomic keep-last-N checkpoints; the Checkpointer (state in and out)
- ``resume``         a resumed run keeps its config; differences are refused
- ``nonfinite``      stop / skip / rollback on a NaN or inf loss
- ``config_check``   unknown keys and unset values refused before anything runs
- ``summary``        summary.json and the end-of-run block
- ``console_log``    the console copied into train.log
- ``sweep_callback`` the table that ends a multirun
- ``schedules``      the lr schedules, by name
- ``distributed``, ``batching``, ``seeding``, ``errors``: torchrun/DDP, batch
  plan, derived seeds, HarnessError
"""
