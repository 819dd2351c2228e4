"""Peak RSS and wall time of ``load_model`` on one checkpoint, in this process (run it once per measure).

    python docs/bench/resident_load.py write DIR [LAYERS EXPERTS]   # random Mixtral, hidden 1024
    python docs/bench/resident_load.py load DIR                     # one JSON line
    python docs/bench/resident_load.py load-cold DIR                # the same, model code not imported

*floor*: torch and transformers imported and the model built on the meta device (``load``), or
``moe_runtime.runtime`` imported as by ``bench cpu-peer``'s resident child, transformers' model code
not (``load-cold``: the load then imports it); the load's peak (``VmHWM``) is reported above it and
against the weights' bytes. ``load_cpu_s``: CPU time of the process during the load (all threads);
``main_thread_cpu_s``: the calling thread's (with a core free for the reader threads, about the wall time).
"""

import json
import sys
import time


def hwm_mb() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "write":
        from moe_runtime.testing import save_random_checkpoint

        layers, experts = (int(v) for v in (sys.argv[3:5] or ["8", "16"]))
        save_random_checkpoint(
            "mixtral", path, hidden_size=1024, intermediate_size=1024, num_hidden_layers=layers,
            num_experts=experts, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
            sliding_window=None,  # full attention, as in issue #19 and `bench cpu-peer`
        )  # fmt: skip
        return
    if mode == "load-cold":
        import moe_runtime.runtime  # noqa: F401
    else:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    floor = hwm_mb()
    from moe_runtime.models import load_model

    start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    model = load_model(path)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    main_cpu = time.thread_time() - main_cpu
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak = hwm_mb()
    print(json.dumps({
        "mode": mode, "floor_mb": floor, "peak_mb": peak, "weights_mb": round(weights), "load_s": round(seconds, 2), "load_cpu_s": round(cpu, 2), "main_thread_cpu_s": round(main_cpu, 2),
        "peak_over_weights": round(peak / weights, 3), "above_floor_over_weights": round((peak - floor) / weights, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
