#!/usr/bin/env bash
# Make sure the offline data sets qdistill's demo, tests and benchmarks use are on this machine.
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist, fortune texts (BitDistill's
# topic task) from the Debian package fortunes, WordNet glosses (BitDistill's wordnet-10 task)
# from wordnet-base; install what is missing when we are root,
# otherwise say how to get it (the tests that need it skip; the demo and benchmarks say so).
set -u
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/games/fortunes/computers ] || need+=(fortunes)
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${need[*]}..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
    >/tmp/qdistill-apt.log 2>&1 || { echo "apt-get failed; see /tmp/qdistill-apt.log"; exit 0; }
else
  echo "missing Debian packages: ${need[*]}. Get them with: sudo apt-get install ${need[*]}"
  echo "(Fashion-MNIST: or pass --data-dir DIR holding the four idx .gz files, or --download)"
fi
exit 0
