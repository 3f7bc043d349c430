"""The export path: task.py claims an export and run.py runs the merge child (child.py) under the shared
supervisor, storing the merged model folder as a file of its own."""
