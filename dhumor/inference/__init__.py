"""The inference path: pipeline, runner, results files and engines."""
