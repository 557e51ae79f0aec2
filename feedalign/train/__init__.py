"""The trainer: options (config.py), the run (session.py: `train`, exported as
`feedalign.run_training`), one epoch (loop.py), optimizers and schedule (optim.py),
checkpoints, the run directory's evidence (runlog.py) and ownership (rundir.py),
and the `feedalign train` / `feedalign eval` commands (cli.py)."""
