"""``python -m llmopt``: the ``llmopt`` command line (``compress``, ``report``, ``bench``, ``demo``);
with no arguments it runs the demo, which compresses a small model and prints its memory report."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
