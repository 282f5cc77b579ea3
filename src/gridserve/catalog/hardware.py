"""Accelerator specs. Every figure carries its public source.

Sources (abbreviated below):
  [llm-analysis]  github.com/cli99/llm-analysis, llm_analysis/gpu_configs/*.json
  [llm-viewer]    github.com/hahnyuan/LLM-Viewer, hardwares/hardware_params.py
  [nv-h100]       NVIDIA H100 Tensor Core GPU datasheet
  [nv-l40s]       NVIDIA L40S datasheet
  [secondary]     spec aggregators (TechPowerUp GPU database); marked as secondary in shared/data
  [gpu-bench]     github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference README (llama.cpp, Llama 3 8B)
  [rent]          typical on-demand rental listings 2024-25 (GPU marketplaces; GCP T4 $0.35/h): planning figures
Decode efficiency = measured tokens/s ÷ (bandwidth / weight bytes), from [gpu-bench] (8B F16 row).
"""

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class HardwareSpec:
    key: str
    name: str
    hw_class: str
    """'datacenter', 'consumer-high', 'consumer', 'apple' or 'cpu' (tiers allow classes: catalog/tiers.py)."""
    arch: str
    bandwidth_gbs: float
    """Memory bandwidth, GB/s (1e9 bytes/s)."""
    memory_gib: float
    fp16_tflops: float
    """Dense FP16/BF16 tensor throughput, TFLOPS."""
    dtypes: frozenset[str]
    quantizations: frozenset[str]
    decode_efficiency: float
    """Share of the bandwidth bound reached in decode."""
    prefill_efficiency: float = 0.5
    """Share of peak FLOPS reached in prefill (a planning figure; calibrated per node at run time)."""
    cost_per_hour: float = 0.0
    """USD per hour to run it: a planning figure from typical 2024-25 rental listings [rent], used to derive
    a default price; operators override it within bounds."""
    batch_slots: int = 8
    """Sequences decoded together before ITL grows steeply (continuous batching); 1 = a serial engine."""


_GGUF = frozenset({"none", "q8_0", "q4_k_m", "q5_k_m", "q6_k"})
_GPU_Q = _GGUF | frozenset({"awq", "gptq", "int8"})
_AMPERE = frozenset({"float32", "float16", "bfloat16"})
_FP8 = _AMPERE | frozenset({"fp8"})

HARDWARE: dict[str, HardwareSpec] = {
    spec.key: spec
    for spec in (
        # 3,350 GB/s, 80 GB, 989 TFLOPS [llm-analysis][nv-h100]; FP8 on Hopper [nv-h100].
        # Decode efficiency 0.54: H100 PCIe row of [gpu-bench]; the SXM part is assumed alike.
        HardwareSpec(
            key="h100-sxm",
            name="NVIDIA H100 SXM",
            hw_class="datacenter",
            arch="hopper",
            bandwidth_gbs=3350,
            memory_gib=80,
            fp16_tflops=989,
            dtypes=_FP8,
            quantizations=_GPU_Q | {"fp8"},
            decode_efficiency=0.54,
            cost_per_hour=2.5,
        ),
        # 2,000 GB/s, 80 GB, 756 TFLOPS [llm-analysis]; 67.8 tok/s = 54% of bound [gpu-bench].
        HardwareSpec(
            key="h100-pcie",
            name="NVIDIA H100 PCIe",
            hw_class="datacenter",
            arch="hopper",
            bandwidth_gbs=2000,
            memory_gib=80,
            fp16_tflops=756,
            dtypes=_FP8,
            quantizations=_GPU_Q | {"fp8"},
            decode_efficiency=0.54,
            cost_per_hour=2.0,
        ),
        # 2,039 GB/s, 80 GB, 312 TFLOPS [llm-analysis][llm-viewer]; 53.2 tok/s = 42% [gpu-bench].
        HardwareSpec(
            key="a100-80g",
            name="NVIDIA A100 80GB SXM",
            hw_class="datacenter",
            arch="ampere",
            bandwidth_gbs=2039,
            memory_gib=80,
            fp16_tflops=312,
            dtypes=_AMPERE,
            quantizations=_GPU_Q,
            decode_efficiency=0.42,
            cost_per_hour=1.5,
        ),
        # 1,555 GB/s, 40 GB, 312 TFLOPS [llm-viewer]; efficiency as the 80 GB part [gpu-bench].
        HardwareSpec(
            key="a100-40g",
            name="NVIDIA A100 40GB",
            hw_class="datacenter",
            arch="ampere",
            bandwidth_gbs=1555,
            memory_gib=40,
            fp16_tflops=312,
            dtypes=_AMPERE,
            quantizations=_GPU_Q,
            decode_efficiency=0.42,
            cost_per_hour=1.1,
        ),
        # 864 GB/s, 48 GB, 362 TFLOPS dense [nv-l40s]; FP8 on Ada; 43.4 tok/s = 81% [gpu-bench].
        HardwareSpec(
            key="l40s",
            name="NVIDIA L40S",
            hw_class="datacenter",
            arch="ada",
            bandwidth_gbs=864,
            memory_gib=48,
            fp16_tflops=362,
            dtypes=_FP8,
            quantizations=_GPU_Q | {"fp8"},
            decode_efficiency=0.81,
            cost_per_hour=0.9,
        ),
        # 1,008 GB/s, 24 GB, 165 TFLOPS FP32-accumulate [secondary]; 54.3 tok/s = 87% [gpu-bench].
        HardwareSpec(
            key="rtx4090",
            name="NVIDIA GeForce RTX 4090",
            hw_class="consumer-high",
            arch="ada",
            bandwidth_gbs=1008,
            memory_gib=24,
            fp16_tflops=165,
            dtypes=_FP8,
            quantizations=_GPU_Q | {"fp8"},
            decode_efficiency=0.87,
            cost_per_hour=0.4,
        ),
        # 936 GB/s, 24 GB, ~71 TFLOPS (unconfirmed) [secondary]; 46.5 tok/s = 80% [gpu-bench].
        HardwareSpec(
            key="rtx3090",
            name="NVIDIA GeForce RTX 3090",
            hw_class="consumer-high",
            arch="ampere",
            bandwidth_gbs=936,
            memory_gib=24,
            fp16_tflops=71,
            dtypes=_AMPERE,
            quantizations=_GPU_Q,
            decode_efficiency=0.80,
            cost_per_hour=0.25,
        ),
        # 600 GB/s, 24 GB, 70 TFLOPS [llm-analysis]; no [gpu-bench] row: consumer-range 0.75 assumed.
        HardwareSpec(
            key="a10g",
            name="NVIDIA A10G",
            hw_class="datacenter",
            arch="ampere",
            bandwidth_gbs=600,
            memory_gib=24,
            fp16_tflops=70,
            dtypes=_AMPERE,
            quantizations=_GPU_Q,
            decode_efficiency=0.75,
            cost_per_hour=0.75,
        ),
        # 320 GB/s, 16 GB, 65 TFLOPS [secondary]; Turing: no BF16, no FP8; 0.75 assumed.
        HardwareSpec(
            key="t4",
            name="NVIDIA T4",
            hw_class="datacenter",
            arch="turing",
            bandwidth_gbs=320,
            memory_gib=16,
            fp16_tflops=65,
            dtypes=frozenset({"float32", "float16"}),
            quantizations=_GPU_Q,
            decode_efficiency=0.75,
            cost_per_hour=0.35,
        ),
        # Apple M2 (base) 100 GB/s unified [secondary]; M2 Ultra 36.3 tok/s = 73% of bound [gpu-bench].
        # ~3.6 TFLOPS FP16 GPU [secondary]. Memory: 24 GB configuration.
        HardwareSpec(
            key="apple-m2",
            name="Apple M2",
            hw_class="apple",
            arch="apple",
            bandwidth_gbs=100,
            memory_gib=24,
            fp16_tflops=3.6,
            dtypes=_AMPERE,
            quantizations=_GGUF,
            decode_efficiency=0.73,
            cost_per_hour=0.1,
        ),
        # M2 Pro 200 GB/s, M2 Max 400 GB/s unified; ~6.8 / ~13.6 TFLOPS FP16 GPU [secondary].
        HardwareSpec(
            key="apple-m2-pro",
            name="Apple M2 Pro",
            hw_class="apple",
            arch="apple",
            bandwidth_gbs=200,
            memory_gib=32,
            fp16_tflops=6.8,
            dtypes=_AMPERE,
            quantizations=_GGUF,
            decode_efficiency=0.73,
            cost_per_hour=0.15,
        ),
        HardwareSpec(
            key="apple-m2-max",
            name="Apple M2 Max",
            hw_class="apple",
            arch="apple",
            bandwidth_gbs=400,
            memory_gib=64,
            fp16_tflops=13.6,
            dtypes=_AMPERE,
            quantizations=_GGUF,
            decode_efficiency=0.73,
            cost_per_hour=0.25,
        ),
        # M2 Ultra: 800 GB/s, up to 192 GB unified, ~27 TFLOPS FP16 GPU [secondary]; 73% [gpu-bench].
        HardwareSpec(
            key="apple-m2-ultra",
            name="Apple M2 Ultra",
            hw_class="apple",
            arch="apple",
            bandwidth_gbs=800,
            memory_gib=192,
            fp16_tflops=27,
            dtypes=_AMPERE,
            quantizations=_GGUF,
            decode_efficiency=0.73,
            cost_per_hour=0.4,
        ),
        # A generic server CPU socket: DDR5 8-channel ~300 GB/s theoretical is optimistic for one
        # process; 50 GB/s and 1 TFLOPS are planning figures, replaced by per-node calibration.
        HardwareSpec(
            key="cpu",
            name="CPU",
            hw_class="cpu",
            arch="cpu",
            bandwidth_gbs=50,
            memory_gib=16,
            fp16_tflops=1.0,
            dtypes=frozenset({"float32", "float16", "bfloat16"}),  # llama.cpp runs F16 weights on CPUs
            quantizations=_GGUF,
            decode_efficiency=0.5,
            prefill_efficiency=0.3,
            cost_per_hour=0.05,
            batch_slots=1,
        ),
    )
}


class UnknownHardware(KeyError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"unknown hardware {self.key!r}; known: {', '.join(sorted(HARDWARE))}"


def hardware_spec(key: str) -> HardwareSpec:
    try:
        return HARDWARE[key]
    except KeyError:
        raise UnknownHardware(key) from None


NVML_NAMES: dict[str, str] = {
    # Device names as NVML reports them (nvidia-smi --query-gpu=name) -> catalogue key.
    "NVIDIA H100 80GB HBM3": "h100-sxm",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H200": "h100-sxm",
    "NVIDIA A100-SXM4-80GB": "a100-80g",
    "NVIDIA A100-SXM4-40GB": "a100-40g",
    "NVIDIA A100-PCIE-40GB": "a100-40g",
    "NVIDIA L40S": "l40s",
    "NVIDIA GeForce RTX 4090": "rtx4090",
    "NVIDIA GeForce RTX 3090": "rtx3090",
    "NVIDIA A10G": "a10g",
    "Tesla T4": "t4",
}


def accelerator_for_gpu(name: str) -> str | None:
    return NVML_NAMES.get(name.strip())
