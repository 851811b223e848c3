"""``python -m recipes.vision fit --config recipes/vision/configs/quick.yaml`` (see :mod:`recipes.vision.cli`).

Lightning's popen launcher re-runs this command line once per extra rank, so importing this module must have
no side effects beyond running the command line.
"""

from recipes.vision.cli import main

if __name__ == "__main__":
    main()
