"""``python -m recipes.translation fit --config recipes/translation/configs/quick.yaml``"""

from recipes.translation.cli import main

if __name__ == "__main__":
    main()
