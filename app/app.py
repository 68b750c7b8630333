"""The Gradio moderation demo as a standalone script: ``python app/app.py [dhumor demo options]``.

Same as ``dhumor demo``; e.g. ``python app/app.py --port 7860 --explain offline``.
"""
import sys

from dhumor.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
