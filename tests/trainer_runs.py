"""Runs train_gpt.py as a subprocess on tiny CPU configurations of the embedded sample."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY = {
    "VOCAB_SIZE": "1024", "NUM_LOOPS": "0", "PARALLEL_START_LAYER": "-1", "XSA_LAST_N": "2",
    "DATA_PATH": str(SAMPLE / "datasets" / "fineweb10B_sp1024"),
    "TOKENIZER_PATH": str(SAMPLE / "tokenizers" / "fineweb_1024_bpe.model"),
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "GRAD_ACCUM_STEPS": "1",
    "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "VAL_BATCH_TOKENS": "16384", "EMA_DECAY": "0",
    "TRAIN_LOG_EVERY": "1", "COMPILE": "0", "TTT_ENABLED": "0", "EVAL_STRIDE": "0",
}


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(TINY)
    env.update(overrides)
    return env


def run_trainer(tmp: Path, nproc: int = 1, script: str = "train_gpt.py", check: bool = True,
                **overrides: str) -> subprocess.CompletedProcess:
    env = clean_env(LOG_DIR=str(tmp), RUN_ID="t", **overrides)
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"trainer failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def summary(tmp: Path) -> dict:
    return json.loads((tmp / "t.json").read_text())


def train_losses(tmp: Path) -> list[float]:
    text = (tmp / "t.txt").read_text()
    return [float(m) for m in re.findall(r"^step:\d+/\d+ train_loss:([0-9.]+)", text, re.M)]
