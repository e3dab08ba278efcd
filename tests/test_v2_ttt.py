"""The TTT scorer (golf/ttt.py) sees the research model's own forward for every v2 knob: with the
LoRA adapters at zero its logits are the plain logits (the record knobs: tests/test_eval.py)."""
import pytest

from tests.test_eval import check_ttt_forward_is_the_model_forward
from tests.v2_models import build

pytestmark = pytest.mark.usefixtures("one_thread")
SWITCHES = [{}, {"ARCH_FAMILY": "gpt2"}, {"ARCH_FAMILY": "llama"}, {"BIAS": 1}, {"DROPOUT": 0.3},
            {"TIE_EMBEDDINGS": 0}, {"MLP_ACTIVATION": "relu2"}, {"MLP_ACTIVATION": "gelu"},
            {"MLP_ACTIVATION": "swiglu"}, {"NORM_TYPE": "layer"}, {"POS_ENCODING": "alibi"},
            {"POS_ENCODING": "learned"}, {"POS_ENCODING": "none"}, {"ATTN_WINDOW": 8}, {"ATTN_SINKS": 2},
            {"ATTN_GATE_TYPE": "channel"}, {"POS_ENCODING": "alibi", "ATTN_WINDOW": 6, "ATTN_SINKS": 1},
            {"MOE_EXPERTS": 4}, {"MOE_EXPERTS": 4, "MOE_ROUTING": "capacity", "MOE_LAYERS": "1-2"},
            {"MOE_EXPERTS": 4, "MOE_ROUTER": "som", "SOM_KEY_DIM": 8}]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_ttt_forward_with_zero_adapters_is_the_model_forward(switch):
    m = build(**switch).eval()
    # the targets the trainer resolves (MoE blocks have no fc / proj), plus q and v
    targets = tuple(dict.fromkeys(m.cfg.ttt_lora_targets.split(",") + ["q", "v"]))
    check_ttt_forward_is_the_model_forward(m, targets)
