#!/usr/bin/env python3
"""llama.cpp's generation speed on the same GGUF file as Apex's local model, for
docs/benchmarks.md (issue: compare with llama.cpp on the same model and machine).

Needs llama-cpp-python (builds llama.cpp from source; about 15 minutes on 2 cores):
  python3 -m venv /tmp/llamacpp
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" /tmp/llamacpp/bin/pip install llama-cpp-python
  /tmp/llamacpp/bin/python bench/llamacpp_speed.py data/models/SmolLM2-135M-Instruct.Q4_1.gguf

Same protocol as `cargo run --release -p apex-server --example llm_bench`: one thread,
greedy, 128 generated tokens per request, the same prompts in ChatML; decode speed is
counted from the first generated token to the last.
"""

import sys
import time

from llama_cpp import Llama

PROMPTS = [
    "Write a detailed essay about the history of the bicycle.",
    "Explain in detail how a city water system works, step by step.",
    "Write a long story about a lighthouse keeper and a storm.",
]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "data/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    llm = Llama(model_path=path, n_threads=1, n_threads_batch=1, n_ctx=2048, verbose=False)
    print(f"llama.cpp via llama-cpp-python, {path}, 1 thread, {tokens} tokens")
    for prompt in PROMPTS:
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        started = time.perf_counter()
        first = None
        count = 0
        for _ in llm.create_completion(text, max_tokens=tokens, temperature=0.0, stream=True):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        rate = (count - 1) / (end - first) if count > 1 else 0.0
        print(f"  first token after {first - started:.3f} s; generated {count} tok at {rate:.1f} tok/s")


if __name__ == "__main__":
    main()
