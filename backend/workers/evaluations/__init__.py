"""The evaluation path: task.py claims an evaluation and run.py runs the harness child (child.py) under the
shared supervisor, recording the results in SQL and in the adapter archive."""
