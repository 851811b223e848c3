#!/usr/bin/env bash
# The main job: 4 CPU processes train a small CNN on 5,000 real MNIST digits with gossip_local, then print the
# averaged model's test accuracy and the bytes each rank sent next to what DDP would have sent.
# Extra arguments go to the demo (see: scripts/demo.sh --help).
DOPT_EXTRAS=""
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec "$PY" -m recipes.vision.demo "$@"
