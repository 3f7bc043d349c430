"""The job path: task.py claims a job and runs one attempt (attempt.py): preparation.py validates and plans it,
runner.py runs the trainer child (child.py) under the shared supervisor, recorder.py persists its reports and
outcome.py records how it ended."""
