"""Re-quantize a trained checkpoint without retraining, so quantization ablations share one model.

    python -m quant requantize logs/RUN_model.pre.bin [--out OUT.bin] [--score] [--stages]
    python -m quant requantize logs/RUN_model.pre.bin --score --variant gptq:QUANT_METHOD=gptq \
        --variant rtn:QUANT_METHOD=rtn,LQER_ENABLED=0 [--out DIR]    several exports, one process

Reads the pre-quantization weights a training run saved (`<RUN_ID>_model.pre.bin`, pickle-free, with
the run's settings in its meta) and, when present, its calibration Hessians (`<RUN_ID>_hessians.bin`).
Quantization and evaluation knobs come from the environment exactly as for the trainer
(QUANT_METHOD, MATRIX_BITS, EMBED_BITS, *_CLIP_SIGMAS, LQER_*, COMPRESSOR, FIT_BUDGET, EVAL_*, TTT_*,
DATA_PATH, TOKENIZER_PATH); the model's shape comes from the checkpoint. Prints the size lines and,
with --score, the pre-quantization and round-trip val_bpb (--stages adds the sliding-window and TTT
stages); a JSON summary goes next to --out (or the checkpoint).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# The trainer's knobs that describe the model; everything else may differ from the training run.
MODEL_KNOBS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "LEAKY_SLOPE",
               "ROPE_DIMS", "ROPE_BASE", "QK_GAIN_INIT", "LN_SCALE", "LOGIT_SOFTCAP", "NUM_LOOPS", "LOOP_START",
               "LOOP_END", "PARALLEL_START_LAYER", "PARALLEL_FINAL_LANE", "SKIP_GATES_ENABLED", "XSA_LAST_N",
               "SPARSE_ATTN_GATE_ENABLED", "GATE_WIDTH", "SPARSE_ATTN_GATE_SCALE", "SMEAR_GATE_ENABLED",
               "SMEAR_WIDTH", "DOC_ISOLATION", "TRAIN_SEQ_LEN")


def load_checkpoint(path: Path):
    from quant.serialize import deserialize

    if not path.is_file():
        raise FileNotFoundError(f"requantize: no checkpoint at {path} (expected <RUN_ID>_model.pre.bin)")
    state, meta = deserialize(path.read_bytes())
    if "config" not in meta:
        raise ValueError(f"requantize: {path} has no training config in its meta; is it a *_model.pre.bin file?")
    hessian_path = path.with_name(path.name.replace("_model.pre.bin", "_hessians.bin"))
    hessians = deserialize(hessian_path.read_bytes())[0] if hessian_path.is_file() and hessian_path != path else None
    return state, meta, hessians, hessian_path


def run_config(saved: dict, env=None):
    """The trainer's settings: the checkpoint's model shape, everything else from the environment."""
    import train_gpt as tg
    from golf.config import parse_knobs

    cfg = parse_knobs(tg.KNOBS, os.environ if env is None else env)
    clash = [k for k in MODEL_KNOBS if cfg.sources.get(k) == "env" and saved.get(k) != getattr(cfg, k.lower())]
    if clash:
        raise ValueError(f"requantize: {', '.join(clash)} set in the environment but the model shape comes from "
                         "the checkpoint; unset them")
    return cfg.replace(**{k.lower(): saved[k] for k in MODEL_KNOBS if k in saved})


class _Scorer:
    """The val stream, its byte counts and a model to load weights into, built once per process."""

    def __init__(self, cfg, device):
        import train_gpt as tg
        from data.shards import load_stream
        from golf.bpb import ByteCounter, load_byte_sidecar
        from golf.evaluate import target_bytes

        self.cfg, self.device = cfg, device
        self.model = tg.GPT(cfg).to(device)
        counter = ByteCounter.from_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
        data = Path(cfg.data_path)
        self.val = load_stream(str(data / "fineweb_val_[0-9]*.bin"))
        sidecar = load_byte_sidecar(str(data / "fineweb_val_bytes_*.bin"), len(self.val)) \
            if list(data.glob("fineweb_val_bytes_*.bin")) else None
        self.byte_counts = target_bytes(self.val, counter, sidecar)
        self.autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def validate(self, seq_len: int | None = None, stride: int = 0):
        import train_gpt as tg
        from golf.evaluate import evaluate_stream

        seq_len = seq_len or self.cfg.train_seq_len
        self.model.eval()

        def loss(x, y):
            with self.autocast:
                return self.model(x, y, reduction="none")
        batch = max(1, self.cfg.val_batch_tokens // seq_len)
        return evaluate_stream(loss, self.val, seq_len, batch, self.byte_counts, self.device, stride=stride,
                               layout=tg.val_layout(self.cfg, seq_len, stride))

    def score(self, name: str, weights: dict, prefix: str = "") -> dict:
        t0 = time.perf_counter()
        self.model.load_state_dict(weights)
        loss, bpb = self.validate()
        print(f"{prefix}final_{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{time.perf_counter() - t0:.1f}s")
        print(f"{prefix}final_{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        return {"val_loss": loss, "val_bpb": bpb}


def _export(cfg, state, hessians, path: Path, hessian_path: Path, out_path: Path, prefix: str = "") -> tuple[bytes, dict]:
    """Quantizes and packs `state` with cfg's knobs, prints the size lines, writes the model bytes."""
    import train_gpt as tg
    from quant.artifact import size_log_lines
    from quant.pack import code_bytes as packed_code_bytes

    if cfg.quant_method == "gptq" and hessians is None:
        raise FileNotFoundError(f"requantize: QUANT_METHOD=gptq needs {hessian_path}; set QUANT_METHOD=rtn or int8")
    print(f"{prefix}requantize {path} method:{cfg.quant_method} hessians:{'yes' if hessians else 'no'}")
    code = packed_code_bytes(tg.__file__)
    t0 = time.perf_counter()
    blob, fit_steps, _ = tg.quantize_and_pack(cfg, state, hessians, code, lambda line: print(prefix + line))
    export_s = time.perf_counter() - t0
    label = tg.export_label(cfg)
    for line in size_log_lines(code, len(blob), label):
        print(prefix + line)
    out_path.write_bytes(blob)
    print(f"{prefix}export_time:{export_s:.1f}s wrote {out_path}")
    return blob, {"checkpoint": str(path), "method": cfg.quant_method, "label": label, "export_s": export_s,
                  "bytes": {"code": code, "model": len(blob), "total": code + len(blob)}, "fit_steps": fit_steps,
                  "quant_knobs": {k: v for k, v in cfg.as_dict().items() if k in _QUANT_KNOBS}, "stages": {}}


def _round_trip(cfg, blob: bytes) -> dict:
    from quant import export
    from quant.int8 import unpack_int8
    return unpack_int8(blob) if cfg.quant_method == "int8" else export.unpack(blob)


def _load(checkpoint: str):
    path = Path(checkpoint)
    state, meta, hessians, hessian_path = load_checkpoint(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = {k: v.to(device) for k, v in state.items()}  # GPTQ runs where the tensors are
    hessians = {k: v.to(device) for k, v in hessians.items()} if hessians else None
    return path, state, meta, hessians, hessian_path, device


def requantize(checkpoint: str, out: str | None = None, score: bool = False, stages: bool = False) -> dict:
    import train_gpt as tg
    from golf.runlog import write_summary

    path, state, meta, hessians, hessian_path, device = _load(checkpoint)
    cfg = run_config(meta["config"])
    out_path = Path(out) if out else path.with_name(path.name.replace("_model.pre.bin", f"_model.{cfg.quant_method}.requant.bin"))
    blob, result = _export(cfg, state, hessians, path, hessian_path, out_path)
    if score:
        scorer = _Scorer(cfg, device)
        result["stages"]["prequant"] = scorer.score("prequant", state)
        result["stages"]["quant_roundtrip"] = scorer.score("quant_roundtrip", _round_trip(cfg, blob))
        gap = result["stages"]["quant_roundtrip"]["val_bpb"] - result["stages"]["prequant"]["val_bpb"]
        print(f"quant_gap val_bpb:{gap:+.5f}")
        result["quant_gap_bpb"] = gap
        if stages:
            result["stages"].update(tg.final_stages(cfg, scorer.model, scorer.val, scorer.byte_counts, scorer.validate,
                                                    scorer.autocast, device, print))
    write_summary(out_path.with_suffix(".json"), result)
    print(f"summary: {out_path.with_suffix('.json')}")
    return result


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:KNOB=VALUE,KNOB=VALUE` (knobs may be empty: `NAME:`) -> (NAME, {KNOB: VALUE})."""
    name, sep, knobs = text.partition(":")
    pairs = [kv for kv in knobs.split(",") if kv]
    if not sep or not name or not all("=" in kv for kv in pairs):
        raise ValueError(f"--variant {text!r}: expected NAME:KNOB=VALUE[,KNOB=VALUE...]")
    return name, dict(kv.split("=", 1) for kv in pairs)


def requantize_variants(checkpoint: str, variants: list[tuple[str, dict[str, str]]], out_dir: str | None = None,
                        score: bool = False) -> dict[str, dict]:
    """Several exports of one checkpoint in one process: checkpoint, Hessians, val data and the
    pre-quantization score are loaded or computed once. Each variant's knobs override the environment;
    its lines are prefixed `NAME: ` and its bytes and summary go to OUT_DIR/NAME.bin and .json
    (default: beside the checkpoint). A table of bytes and gaps ends the output."""
    from golf.runlog import write_summary

    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must differ: {names}")
    path, state, meta, hessians, hessian_path, device = _load(checkpoint)
    configs = {name: run_config(meta["config"], {**os.environ, **knobs}) for name, knobs in variants}  # bad knobs fail first
    folder = Path(out_dir) if out_dir else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    scorer, pre, results = None, None, {}
    for name, cfg in configs.items():
        blob, result = _export(cfg, state, hessians, path, hessian_path, folder / f"{name}.bin", f"{name}: ")
        if score:
            if scorer is None:
                scorer = _Scorer(cfg, device)
                pre = scorer.score("prequant", state)
            scorer.cfg = cfg  # evaluation knobs (VAL_LAYOUT, VAL_BATCH_TOKENS) may differ per variant
            result["stages"] = {"prequant": pre, "quant_roundtrip": scorer.score("quant_roundtrip", _round_trip(cfg, blob),
                                                                                 f"{name}: ")}
            result["quant_gap_bpb"] = result["stages"]["quant_roundtrip"]["val_bpb"] - pre["val_bpb"]
        write_summary(folder / f"{name}.json", result)
        results[name] = result
    width = max(map(len, names))
    for name, r in results.items():
        gap = f" quant_gap:{r['quant_gap_bpb']:+.5f}" if "quant_gap_bpb" in r else ""
        print(f"variant {name:<{width}} {r['label']} total_bytes:{r['bytes']['total']}{gap}")
    return results


_QUANT_KNOBS = ("QUANT_METHOD", "MATRIX_BITS", "EMBED_BITS", "ATTN_CLIP_SIGMAS", "MLP_CLIP_SIGMAS", "EMBED_CLIP_SIGMAS",
                "MATRIX_CLIP_SIGMAS", "LQER_ENABLED", "LQER_RANK", "LQER_TOP_K", "COMPRESSOR", "FIT_BUDGET")
