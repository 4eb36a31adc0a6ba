#!/bin/bash
cd /work/main
for pair in 1 2 3; do
  for side in a97b823 main; do
    if [ $side = a97b823 ]; then srv=/tmp/durable_run_a97b823.sh; else srv=/work/main/.venv/bin/pushsvc; fi
    if [ $pair = 2 ]; then :; fi
    .venv/bin/python bench/durable.py --phases N --duration 8 --pushsvc $srv --out /tmp/abfinal/durable-$pair-$side.md --note "final A/B pair $pair: server $side" > /tmp/abfinal/log-$pair-$side.txt 2>&1
    sleep 20
  done
done
echo done
