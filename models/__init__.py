"""GroundThink models: RWKV-6 + Mamba-2 parallel hybrids, their fusions, and GPT / RWKV-6 / Mamba-2 baselines.

A plain library (never imports Dagster). Entry points:
    models.get_model(name, vocab_size, size="5m", **overrides) -> LM      names: models.list_models()
    out = model(idx, state=None, return_states=False, return_activations=False) -> ModelOutput
    gpt.kv_cache(batch_size, capacity) -> KVCache     GPT's decoding state: model(idx, state=cache) continues it
    models.component_of(name), models.no_weight_decay(name, param)        optimizer groups, G4 ratio
    models.ablate(model, "rwkv" | "mamba", layers=None), models.mean_ablate(model, branch, means, layers=None),
    models.force_gate(model, value, layers=None)
Layers: models.RWKV6TimeMix, models.RWKV6ChannelMix, models.Mamba2; ops: models.ssd.
"""
from .config import BASELINE_NAMES, HYBRID_NAMES, MODEL_NAMES, SIZE_PRESETS, ModelConfig
from .fusion import RMSNorm, make_fusion
from .lm import LM, KVCache, ModelOutput, ModelState
from .mamba2 import Mamba2, RMSNormGated
from .registry import (ablate, canonical_name, component_of, describe_paths, force_gate, get_model, list_models,
                       list_sizes, make_config, mean_ablate, no_weight_decay)
from .rwkv6 import RWKV6ChannelMix, RWKV6TimeMix
from .ssd import ssd_chunked, ssd_ref

__all__ = [
    "get_model", "list_models", "list_sizes", "make_config", "canonical_name", "ModelConfig", "SIZE_PRESETS",
    "MODEL_NAMES", "HYBRID_NAMES", "BASELINE_NAMES", "LM", "ModelOutput", "ModelState", "KVCache",
    "RWKV6TimeMix", "RWKV6ChannelMix", "Mamba2", "RMSNormGated", "RMSNorm", "make_fusion",
    "ssd_chunked", "ssd_ref", "component_of", "no_weight_decay", "ablate", "mean_ablate", "force_gate",
    "describe_paths",
]
