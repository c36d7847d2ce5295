"""avl: training-free adaptive attention (A-VL) and KV-cache policies for vision-language models.

    import avl
    model = avl.load("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)
    out = avl.generate(model, input_ids, pixel_values=pixels, policy=avl.AVL(0.45, 0.30, 3, 0.9, 0.5))
    out.tokens, out.stats.table()
    report = avl.analyze(model, input_ids, pixel_values=pixels)  # modal shares, concentration, PPCI
"""

from avl.analysis import AttentionReport, analyze
from avl.cache.kv_policies import AdaKV, KNorm, ObservedAttention, PyramidKV, RandomEviction, SnapKV
from avl.cache.modal_cache import CacheStats, DecodeStep, LayerCache, ModalCache
from avl.cache.policies import AVL, H2O, FastV, FeaturePolicy, Full, Policy, StreamingLLM
from avl.cache.registry import POLICIES
from avl.cache.token_pruning import PyramidDrop
from avl.cache.trim import Trim
from avl.cache.visionzip import VisionZip
from avl.cache.vl_cache import VLCache
from avl.generate import GenerationOutput, Timings, generate
from avl.loading import load

__all__ = [
    "AVL",
    "AdaKV",
    "AttentionReport",
    "CacheStats",
    "DecodeStep",
    "FastV",
    "FeaturePolicy",
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
    "Timings",
    "Trim",
    "VLCache",
    "VisionZip",
    "analyze",
    "generate",
    "load",
]
