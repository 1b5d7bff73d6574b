#!/bin/sh
# Retrain the spamfilterd model on local mail; promote the candidate only if it passes the gate.
#
# Run by spamfilterd-retrain.service (installed as /opt/spamfilterd/bin/spamfilterd-retrain).
# Layout under the state directory:
#   model            -> models/<stamp>   (symlink; the config's model.checkpoint points here)
#   models/<stamp>/                      (checkpoints; the newest KEEP_MODELS are kept)
#   training/{ham,spam}/                 (mail to learn from: maildir, mbox or .eml folders)
#   evaluation/{ham,spam}/               (held-out mail the gate measures on; never trained on)
# Settings come from the environment (EnvironmentFile=/etc/spamfilterd/retrain.env).
set -eu

STATE=${STATE_DIRECTORY:-/var/lib/spamfilterd}
BIN=${SPAMFILTERD_BIN:-/opt/spamfilterd/bin}
TRAIN_HAM=${TRAIN_HAM:-$STATE/training/ham}
TRAIN_SPAM=${TRAIN_SPAM:-$STATE/training/spam}
EVAL_HAM=${EVAL_HAM:-$STATE/evaluation/ham}
EVAL_SPAM=${EVAL_SPAM:-$STATE/evaluation/spam}
MAX_FPR=${MAX_FPR:-0.005}
KEEP_MODELS=${KEEP_MODELS:-3}
TRAIN_ARGS=${TRAIN_ARGS:-}

current="$STATE/model"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
candidate="$STATE/models/$stamp"
mkdir -p "$STATE/models"

echo "training candidate $candidate"
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of extra flags
"$BIN/spamfilterd-train" --ham "$TRAIN_HAM" --spam "$TRAIN_SPAM" --out "$candidate" --no-progress \
    $TRAIN_ARGS

evaluate() {
    "$BIN/spamfilterd-train" evaluate --model "$1" --ham "$EVAL_HAM" --spam "$EVAL_SPAM" --json
}
new=$(evaluate "$candidate")
old='{}'
if [ -e "$current" ]; then
    old=$(evaluate "$current")
fi

# The gate: false-positive rate (ham called spam) within MAX_FPR, and accuracy no worse than now.
prune() {
    # Keep the newest KEEP_MODELS checkpoints (rejected ones included), never the one in use.
    in_use=$(readlink "$current" 2>/dev/null || true)
    ls -1d "$STATE/models"/*/ 2>/dev/null | sort -r | tail -n +"$((KEEP_MODELS + 1))" |
        while read -r dir; do
            [ "models/$(basename "$dir")" = "$in_use" ] || rm -rf "$dir"
        done
}

# The gate: false-positive rate (ham called spam) within MAX_FPR, and accuracy no worse than now.
if ! "$BIN/python" - "$new" "$old" "$MAX_FPR" <<'GATE'
import json, sys
new, old, max_fpr = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
print(f"candidate: accuracy={new['accuracy']:.4f} fpr={new['fpr']:.4f} n={new['n']}")
if old:
    print(f"current:   accuracy={old['accuracy']:.4f} fpr={old['fpr']:.4f} n={old['n']}")
ok = new["fpr"] <= max_fpr and new["accuracy"] >= old.get("accuracy", 0.0)
sys.exit(0 if ok else 1)
GATE
then
    echo "candidate rejected by the gate (max fpr $MAX_FPR, accuracy >= current); keeping $current"
    mv "$candidate" "$candidate.rejected"
    prune
    exit 0
fi

# Atomic promotion: a new symlink renamed over the old one; spamfilterd picks it up on reload.
ln -sfn "models/$stamp" "$STATE/model.new"
mv -T "$STATE/model.new" "$current"
echo "promoted $candidate"
prune
