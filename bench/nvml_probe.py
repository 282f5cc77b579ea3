"""Probe NVML detection and telemetry on a GPU machine: what a node agent would advertise and report.

Prints JSON: the detected HardwareInfo (catalogue key from the NVML device name) and telemetry samples
taken idle and while the GPU multiplies matrices (utilisation, memory, temperature, SM clock ratio).
Run on a machine with an NVIDIA GPU: `python bench/nvml_probe.py`.
"""

import json
import threading
import time

from gridserve.node.hardware import Nvml, detect_hardware


def load(stop: threading.Event, ready: threading.Event) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    ready.set()
    while not stop.is_set():
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def main() -> None:
    nvml = Nvml.open()
    hardware = detect_hardware(nvml)
    idle = nvml.sample()
    stop, ready = threading.Event(), threading.Event()
    worker = threading.Thread(target=load, args=(stop, ready))
    worker.start()
    ready.wait(120)
    busy = []
    for _ in range(5):
        time.sleep(1.0)
        busy.append(nvml.sample())
    stop.set()
    worker.join()
    print(json.dumps({"hardware": hardware.model_dump(mode="json"), "idle": idle, "busy": busy}, indent=2))


if __name__ == "__main__":
    main()
