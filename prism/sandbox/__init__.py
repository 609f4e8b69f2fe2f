"""Running model-written code: ``executor`` (run_program / run_many, the semantics and the verdict),
``host`` (what the machine can isolate with, a cgroup per job) and ``child`` (the job's trusted init,
sent as text to a fresh interpreter, never imported)."""
