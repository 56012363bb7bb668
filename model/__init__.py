"""GPT-2 model package (torch only): config and presets, the model, grouping rules, FLOPs/MFU."""
from .config import PRESETS, GPTConfig
from .flops import PEAK_FLOPS, count_params, device_peak_flops, flops_per_token
from .gpt import GPT, math_attention
from .param_groups import WEIGHT_DECAY_RULES, muon_param_split, weight_decay_groups

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "PEAK_FLOPS",
    "WEIGHT_DECAY_RULES",
    "count_params",
    "device_peak_flops",
    "flops_per_token",
    "math_attention",
    "muon_param_split",
    "weight_decay_groups",
]
