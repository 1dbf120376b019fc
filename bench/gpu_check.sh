#!/usr/bin/env bash
# bench/gpu_check.sh: every GPU check that bench/RESULTS.md cites, in one command of at most
# BUDGET seconds (default 560, within one 10-minute device call) on one H100/H200: each part has
# its own time limit, cut to what is left; a part that fails is reported and the others still
# run, and every result is printed as it is measured (order: 1, 5, 6, 2, 3, 4):
#   1. ResNet-50 at 224 px: the step (img/s, MFU; both views in one call as an upper bound), and
#      what each placement of the data pipeline delivers on ImageNet-size JPEGs (the loader
#      decodes and crops, or only decodes and the GPU crops)
#   2. ResNet-18 at 32 px on CIFAR-10: the step, the CPU loader vs the dataset held in memory
#   3. a short CIFAR-10 pretraining (ResNet-18, 20 epochs), its linear probe against random init
#   4. resume: a run stopped at step 60 and resumed ends where an uninterrupted one does
#   5. the real loop, ResNet-50 at 224 px, batch 512 on the photos: host synchronisations per
#      step (set_sync_debug_mode), the memory high-water mark, the cost of the synchronised BN
#      (torch's fused kernels, checked against F.batch_norm) against the BN of one process, and
#      the crops made on the GPU (--on-device crop; bench/loop_check.py); steps only, no epoch
#      end in the window
#   6. two processes on the one GPU (gloo: NCCL refuses two on one GPU): DDP, the synchronised
#      BN on CUDA tensors, a stop and a resume whose checkpoint rank 0 sends; their weights
#      against one process's
#
#   bash bench/gpu_check.sh [CIFAR10_FOLDER]
# CIFAR10_FOLDER defaults to data/cifar10, then ../shared/data/cifar10; parts 2-4 need it. Only the
# repository travels to a lent GPU machine, so copy it in first (55 MB; data/ is git-ignored):
#   cp -r ../shared/data/cifar10 data/     # then run with carry: ["data"]
# Results: $OUT (or bench/gpu/) gets summary.txt and the JSON files of each part.
# SMOKE=1 runs every part at a tiny size on the CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results=${OUT:-bench/gpu}
mkdir -p "$results"
cifar=${1:-data/cifar10}
[ -d "$cifar/train" ] || cifar=../shared/data/cifar10
if [ "${SMOKE:-0}" = 1 ]; then  # a folder of 96 + 32 random 32 px images stands in for CIFAR-10
  cifar=$(mktemp -d)
  python3 - "$cifar" <<'PY'
import os, sys, torch, torchvision
for split, n in (('train', 96), ('val', 32)):
    for i in range(n):
        os.makedirs(f'{sys.argv[1]}/{split}/c{i % 4}', exist_ok=True)
        image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
        torchvision.io.write_jpeg(image, f'{sys.argv[1]}/{split}/c{i % 4}/{i}.jpg')
PY
fi
log="$results/summary.txt"
if [ "${SMOKE:-0}" = 1 ]; then  # the settings below, at a size a CPU runs in seconds
  dev=cpu r50=2 r18=16 epochs=1 steps=1 warmup=1 repeats=1 photos_n=48 stop=2 arch=convnet
  extra=(--hidden-dim 64 --projection-dim 32)
  loop=(--arch convnet --width 8 --image-size 64 --batch-size 2 --epochs 1 --stop-at-step 16
        "${extra[@]}")
  two=(--arch convnet --width 8 --batch-size 8 --epochs 2 --amp none "${extra[@]}") half=3 end=6
else
  dev=cuda r50=256 r18=512 epochs=20 steps=10 warmup=5 repeats=3 photos_n=2048 stop=60
  arch=resnet18 extra=()
  loop=(--arch resnet50 --batch-size 512 --epochs 8 --stop-at-step 30)
  # (float32, 20 steps: what stays apart is the float reduction order, not bf16 over an epoch)
  two=(--arch resnet18 --batch-size 256 --epochs 1 --amp none) half=10 end=20
fi
deadline=$(( $(date +%s) + ${BUDGET:-560} ))  # the whole script: one device call (600 s)
part() {  # part SECONDS TITLE COMMAND...: run with a time limit, keep going on failure
  local limit=$1 title=$2 code left=$(( deadline - $(date +%s) )); shift 2
  if [ "$left" -lt 30 ]; then echo "=== skipped, out of time: $title" | tee -a "$log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
  # (-k: byol.py saves a checkpoint on SIGTERM; a part still running 10 s later is killed)
  timeout -k 10 "$limit" "$@" > "$results/part.log" 2>&1; code=$?
  grep -v '^step ' "$results/part.log" | tail -n 40 | tee -a "$log"
  grep '^step ' "$results/part.log" | tail -n 2 | tee -a "$log"
  echo "=== exit $code: $title" | tee -a "$log"
  rm -f "$results/part.log"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, torchvision; print("torch", torch.__version__, "cuda",
              torch.version.cuda, "torchvision", torchvision.__version__)'; nproc; } | tee "$log"

# 1. ResNet-50 at 224 px; a folder of ImageNet-size JPEGs for the pipeline, of varied sizes as
# ImageNet's, so that the loader reads them as it would ImageNet (a folder of photos of one size
# would be held in memory).
photos=$(mktemp -d)
python3 - "$photos" "$photos_n" <<'PY'
import os, sys, torch, torchvision, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
sizes = [(400, 533), (533, 400), (375, 500), (500, 375), (333, 500), (427, 640)]
for i in range(int(sys.argv[2])):
    low = torch.rand(1, 3, 25, 33, generator=g)
    size = sizes[i % len(sizes)]
    image = (F.interpolate(low, size=size, mode='bicubic')[0].clamp(0, 1) * 255).byte()
    folder = f'{sys.argv[1]}/c{i % 8}'
    os.makedirs(folder, exist_ok=True)
    torchvision.io.write_jpeg(image, f'{folder}/{i}.jpg', quality=90)
PY
# 8 names for every photo (hard links: no more disk), so that an epoch holds enough batches for
# the loader to run steadily and for part 5 to time steps well within the first epoch
for copy in 1 2 3 4 5 6 7; do
  for f in "$photos"/c*/[0-9]*.jpg; do ln "$f" "${f%.jpg}_$copy.jpg"; done
done
part 150 "ResNet-50, 224 px, batch $r50: the step and the pipeline" \
  python3 bench/throughput.py --arch resnet50 --image-size 224 --batch-size $r50 --device $dev \
    --warmup $warmup --steps $steps --repeats $repeats --no-ablations --no-baseline --one-call \
    --pipeline "$photos" \
    --pipeline-batches 20 --json "$results/gpu_resnet50_224px.json"

# 5. The real loop on the photos (right after part 1: the parts after it may be cut for time).
part 220 "the real loop: host synchronisations, memory, synchronised BN vs one process's" \
  python3 bench/loop_check.py "$photos" "${loop[@]}" --log-every 20 \
    --json "$results/loop_check.json"

# Two runs' final online weights, compared as one vector (a tensor's own relative difference
# would blow up on the biases before a BN, which stay ~0): compare.py A B LIMIT LABEL
compare=$(mktemp --suffix .py)
cat > "$compare" <<'PY'
import sys, torch
a, b = (torch.load(f'{run}/checkpoint.pth', map_location='cpu') for run in sys.argv[1:3])
assert a['step'] == b['step'], (a['step'], b['step'])
x, y = (torch.cat([s['online'][k].float().flatten() for k in a['online']
                  if a['online'][k].is_floating_point()]) for s in (a, b))
difference = ((x - y).norm() / x.norm()).item()
print(f'{sys.argv[4]}, {a["step"]} steps: relative difference of the online weights '
      f'{difference:.2e}')
assert difference < float(sys.argv[3]), difference
PY

if [ -d "$cifar/train" ]; then
  # 6. Two processes on the one GPU (gloo), stopped and resumed, against one process.
  run2=$(mktemp -d)
  part 150 "two processes on one GPU (gloo): DDP, the synchronised BN, resume" bash -c "
    python3 byol.py --data '$cifar' ${two[*]} --output-dir '$run2/one' --stop-at-step $end &&
    BYOL_BACKEND=gloo python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
      byol.py --data '$cifar' ${two[*]} --output-dir '$run2/two' --stop-at-step $half &&
    BYOL_BACKEND=gloo python3 -m torch.distributed.run --standalone --nproc_per_node=2 \
      byol.py --data '$cifar' ${two[*]} --output-dir '$run2/two' --stop-at-step $end &&
    python3 '$compare' '$run2/one' '$run2/two' 0.01 \
      '2 processes (stopped at step $half, resumed) vs 1'"

  # 2. ResNet-18 at 32 px on CIFAR-10: the step; the loader vs the dataset held in memory.
  part 120 "ResNet-18, 32 px, batch $r18: the step and the pipeline" \
    python3 bench/throughput.py --arch $arch --image-size 32 --batch-size $r18 --device $dev \
      --warmup $warmup --steps $((2 * steps)) --repeats $repeats --no-ablations --no-baseline \
      --pipeline "$cifar" \
      --json "$results/gpu_resnet18_32px.json"
  # 3. Pretraining and the linear probe (random init first: the same encoder before training).
  run=$(mktemp -d)
  common=(--arch $arch --batch-size $r18 --lr 2.0 --tau 0.99 --warmup-epochs 1 --seed 0
          "${extra[@]}")
  part 180 "BYOL on CIFAR-10, $arch, $epochs epochs of batch $r18" \
    python3 byol.py --data "$cifar" "${common[@]}" --epochs $epochs --eval-every 5 \
      --output-dir "$run/byol"
  cp "$run/byol/log.jsonl" "$results/cifar_byol_log.jsonl" 2>/dev/null
  part 60 "linear probe: random init" python3 linear_eval.py --data "$cifar" --arch $arch \
    --small-images --seed 0 --output-dir "$run/probe"
  part 60 "linear probe: BYOL" python3 linear_eval.py --data "$cifar" \
    --pretrained "$run/byol/checkpoint.pth" --output-dir "$run/probe"
  cp "$run/probe/results.jsonl" "$results/cifar_probe.jsonl" 2>/dev/null
  # 4. Resume: 2 epochs in one go, and stopped at step $stop then resumed.
  part 90 "resume check" bash -c "
    python3 byol.py --data '$cifar' ${common[*]} --epochs 2 --output-dir '$run/full' &&
    python3 byol.py --data '$cifar' ${common[*]} --epochs 2 --output-dir '$run/part' \
      --stop-at-step $stop &&
    python3 byol.py --data '$cifar' ${common[*]} --epochs 2 --output-dir '$run/part' &&
    python3 '$compare' '$run/full' '$run/part' 1 \
      'resumed vs uninterrupted (0 on a CPU; cuDNN is not deterministic)'"
else
  echo "no CIFAR-10 folder at $cifar: parts 2-4 skipped (see the header)" | tee -a "$log"
fi

echo "done $(date -u)" | tee -a "$log"
