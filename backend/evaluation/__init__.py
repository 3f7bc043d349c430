"""Sandboxed evaluation of generated code: the bubblewrap sandbox, a lint-only mode and the HumanEval harness."""
