"""avl: training-free adaptive attention (A-VL) and KV-cache policies for vision-language models.

    import avl
    model = avl.load("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)
    out = avl.generate(model, input_ids, pixel_values=pixels, policy=avl.AVL(0.45, 0.30, 3, 0.9, 0.5))
    out.tokens, out.stats.table()
"""

from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.modal_cache import CacheStats, LayerCache, ModalCache
from avl.cache.policies import AVL, H2O, FastV, Full, Policy, StreamingLLM
from avl.cache.registry import POLICIES
from avl.cache.token_pruning import PyramidDrop
from avl.cache.trim import Trim
from avl.cache.visionzip import VisionZip
from avl.generate import GenerationOutput, generate
from avl.loading import load

__all__ = [
    "AVL",
    "AdaKV",
    "CacheStats",
    "FastV",
    "Full",
    "GenerationOutput",
    "H2O",
    "KNorm",
    "LayerCache",
    "ModalCache",
    "ObservedAttention",
    "POLICIES",
    "Policy",
    "PyramidDrop",
    "PyramidKV",
    "RandomEviction",
    "SnapKV",
    "StreamingLLM",
    "Trim",
    "VisionZip",
    "generate",
    "load",
]
