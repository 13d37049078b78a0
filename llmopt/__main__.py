"""``python -m llmopt``: a demo that compresses a small model and prints its memory report."""

from .demo import main

if __name__ == "__main__":
    raise SystemExit(main())
