"""The application on top of the library: the training job, its data, its run directory and the
binaries' helpers. `tools/*.py` are thin absl shells over it; `import tfmp` does not load it.

`config` (TrainConfig and every check), `training` (the job), `data` (synthetic tasks and
tensorflow-datasets), `run_dir` (what a run leaves on disk), `saved_models` (tools/audit's work),
`exporting` (tools/export's work), `cli` (one line and an exit code per bad input).
"""
