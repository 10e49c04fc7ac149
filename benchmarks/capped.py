"""Run a script as if the GPU had only so much memory: does my config fit a 16 GB card?

    python benchmarks/capped.py 16 chatglm_lora/train.py chatglm_lora/configs/glm4_9b_qlora.yaml \\
        --model_name_or_path /models/glm-4-9b-chat-hf --max_steps 20

The first argument is the cap in GiB for every visible GPU (`torch.cuda.set_per_process_memory_fraction`:
what PyTorch's allocator may reserve, weights included), the rest is the script and its
arguments. A run past the cap ends in the script's own CUDA out-of-memory error. At exit the
peak reserved / allocated memory is printed. Outside the cap: the CUDA context (about 0.5 GiB
on a real card) and memory that bypasses PyTorch's allocator (bitsandbytes' paged optimizers).
"""

import atexit
import runpy
import sys
from pathlib import Path

import torch


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    cap = float(sys.argv[1]) * 2**30
    if not torch.cuda.is_available():
        sys.exit("capped.py: no CUDA GPU here, nothing to cap")
    for device in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)

    @atexit.register
    def peak() -> None:
        print(f"capped.py: {sys.argv[0]} under {cap / 2**30:g} GiB: peak reserved "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB, allocated "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU 0)", file=sys.stderr, flush=True)

    script, sys.argv = sys.argv[2], sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script` would
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
