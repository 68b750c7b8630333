"""The apps: the Gradio demo and its team features."""
