"""The training engine: small named components composed by :func:`engine.run.run`.

``train.py`` is the Hydra entry point; everything it needs lives here (each module's contract:
docs/extending.md):

- ``run``            one run: checks, build, resume, the run dir's files, fit, summary
- ``build``          config -> a ready Trainer (``build_trainer``)
- ``trainer``        the training step, evaluation and the loop
- ``optimizers``     the optimizer registry: one module per optimizer, its yaml its config
- ``schedules``      the lr schedule registry (``schedule=<name>``)
- ``registry``       what the registries share (unique names, importing a package's modules)
- ``hessian``        the Sophia Hessian refresh schedule (GNB or Hutchinson) and its cost
- ``metrics``        the record of a logged step; console, metrics.jsonl and W&B sinks
- ``checkpoint``     atomic keep-last-N checkpoints, the Checkpointer, a trained model for tools
- ``resume``         a resumed run keeps its config; the keys that do not change a result
- ``run_dir``        reading a run directory back (metrics, config, overrides, summary)
- ``nonfinite``      stop / skip / rollback on a NaN or inf loss
- ``instability``    the rules that call a run diverged and a loss point a spike
- ``config_check``   unknown keys, unset values and bad values refused before anything runs
- ``schema``         the type and range of every key of the root config's sections
- ``summary``        summary.json and the end-of-run block
- ``console_log``    the console copied into train.log
- ``sweep_callback`` the table that ends a multirun
- ``distributed``, ``batching``, ``seeding``, ``errors``: torchrun/DDP and the gradient-sync
  toggle, the batch plan, derived seeds, HarnessError
"""
