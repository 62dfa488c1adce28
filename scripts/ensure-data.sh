#!/usr/bin/env bash
# Make sure the offline data sets qdistill's demo and tests use are on this machine.
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist; install it when missing and
# we are root, otherwise say how to get it (the tests that need it skip; the demo says so).
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/tmp/qdistill-apt.log 2>&1 || { echo "apt-get failed; see /tmp/qdistill-apt.log"; exit 0; }
else
  echo "Fashion-MNIST not found in $dir. Get it with: sudo apt-get install dataset-fashion-mnist"
  echo "or pass --data-dir DIR holding the four idx .gz files (or --download when online)."
fi
exit 0
