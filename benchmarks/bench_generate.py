"""Generation throughput of jgptq's Flax models (and optionally transformers/PyTorch) on this machine.

For each batch size: B random prompts of ``--prompt-len`` tokens, ``--new-tokens`` greedy tokens
each (EOS disabled, so every row generates all of them). One untimed warm-up run compiles; then
``--repeats`` timed runs. Reported per batch size (median over repeats):

- ``ttft_s``: time to first token (prefill + first sample), from the streaming callback;
- ``decode_tok_s``: generated tokens per second after the first token (B * (N - 1) / decode time);
- ``total_tok_s``: B * N / total wall time.

``--torch`` also times ``transformers`` ``generate`` (bf16 on CUDA when available, else fp32 on CPU)
for the same model, prompts and lengths. Results go to stdout and, with ``--out``, to a JSON file
with the machine description.

    python benchmarks/bench_generate.py --model PATH --batch 1,8,32 --torch --out gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _machine() -> dict[str, Any]:
    import jax

    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def bench_jax(config, params, dtype: str, batches: list[int], prompt_len: int, new_tokens: int,
              repeats: int, seed: int, decode_chunk: int = 8) -> list[dict[str, Any]]:
    import numpy as np

    from jgptq.models.generate import generate
    from jgptq.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM.from_params(config, params, dtype=dtype)
    rng = np.random.default_rng(seed)
    rows = []
    for b in batches:
        prompts = rng.integers(0, config.vocab_size, size=(b, prompt_len)).tolist()
        generate(model, None, prompts, new_tokens, eos_token_id=[], decode_chunk=decode_chunk)  # compile
        runs = []
        for _ in range(repeats):
            stamps: list[float] = []
            t0 = time.perf_counter()
            out = generate(model, None, prompts, new_tokens, eos_token_id=[], decode_chunk=decode_chunk,
                           stream=lambda _s: stamps.append(time.perf_counter()))
            t1 = time.perf_counter()
            assert all(len(o) == new_tokens for o in out)
            runs.append((stamps[0] - t0, t1 - stamps[0], t1 - t0))
        ttft = statistics.median(r[0] for r in runs)
        dec = statistics.median(r[1] for r in runs)
        tot = statistics.median(r[2] for r in runs)
        rows.append({"impl": "jgptq", "dtype": dtype, "decode_chunk": decode_chunk, "batch": b,
                     "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "ttft_s": ttft, "decode_tok_s": b * (new_tokens - 1) / dec if dec > 0 else None,
                     "total_tok_s": b * new_tokens / tot})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_torch(path: Path, batches: list[int], prompt_len: int, new_tokens: int, repeats: int, seed: int,
                vocab: int) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    dev = "cuda" if cuda else "cpu"
    model = model.to(dev).eval()
    rng = np.random.default_rng(seed)
    rows = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for b in batches:
        ids = torch.tensor(rng.integers(0, vocab, size=(b, prompt_len)), device=dev)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, **kw)
            times = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                model.generate(ids, **kw)
                sync()
                times.append(time.perf_counter() - t0)
            sync()
            t0 = time.perf_counter()
            model.generate(ids, **dict(kw, max_new_tokens=1, min_new_tokens=1))
            sync()
            ttft = time.perf_counter() - t0
        tot = statistics.median(times)
        rows.append({"impl": "transformers", "dtype": str(dtype).removeprefix("torch."), "batch": b,
                     "prompt_len": prompt_len, "new_tokens": new_tokens, "ttft_s": ttft,
                     "decode_tok_s": b * (new_tokens - 1) / max(tot - ttft, 1e-9), "total_tok_s": b * new_tokens / tot})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="jgptq compute dtype (default: bf16 on GPU/TPU, fp32 on CPU)")
    p.add_argument("--torch", action="store_true", help="also time transformers on PyTorch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-chunk", type=int, default=8, help="generate()'s decode steps per jitted call")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import jax

    import jgptq.models as models

    if args.model is None:
        from jgptq import artifacts

        path = Path(artifacts.smollm2_gguf())
    else:
        path = Path(args.model)
    dtype = args.dtype or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    dtype_name = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    batches = [int(b) for b in args.batch.split(",")]
    t0 = time.perf_counter()
    config, params, _ = models.load(path, dtype=dtype_name, tokenizer=False)
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {"model": str(path), "load_s": load_s, "machine": _machine(),
                              "config": {"layers": config.num_layers, "hidden": config.hidden_size,
                                         "heads": config.num_heads, "kv_heads": config.num_kv_heads,
                                         "vocab": config.vocab_size}}

    def save() -> None:  # after each implementation, so a long torch run keeps the jgptq numbers
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    result["jgptq"] = bench_jax(config, params, dtype_name, batches, args.prompt_len, args.new_tokens,
                                args.repeats, args.seed, args.decode_chunk)
    save()
    del params
    if args.torch:
        result["transformers"] = bench_torch(path, batches, args.prompt_len, args.new_tokens, args.repeats,
                                             args.seed, config.vocab_size)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
