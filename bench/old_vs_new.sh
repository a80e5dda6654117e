#!/bin/bash
# old and new code alternately, one at a time, same sitting
cd /tmp  # old: a git worktree of the code before (git worktree add /work/wt-old REV)
for round in 1 2; do
  for tree in old main; do
    dir=/work/wt-old; [ $tree = main ] && dir=/work/main
    echo "== round $round $tree $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    PYTHONPATH=$dir RLP_NUM_THREADS=2 /work/main/.venv/bin/python -c "import sys; sys.argv=['rlp']+sys.argv[1:]; from rlp_cli.cli import main; main()" bench --model smollm2-135m --steps 3 --out /tmp/ab-$tree 2>&1 | grep -E "step [0-9]/|rollout  |update  |achieved|peak RSS|busy"
  done
done
