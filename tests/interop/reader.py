"""The independent reader: runs *inside the interop venv* (transformers + optimum + GPTQModel, PyTorch CPU).

It never imports jgptq. The test process writes a JSON job file and runs

    <interop-venv>/bin/python tests/interop/reader.py JOB.json

Each task of ``job["tasks"]`` is one of:

- ``{"kind": "logits", "folder", "ids", "out", "weights_out"?}``: load ``folder`` with
  ``AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16)``, run the
  int64 token ids ``[B, T]`` in the ``.npy`` file ``ids``, save float32 logits ``[B, T, V]`` to ``out``;
  with ``weights_out``, also save (``.npz``) each quantized linear's dequantized weight ``[in, out]``,
  obtained by running the module on an identity matrix (what the kernel really computes).
- ``{"kind": "ppl", "folder", "ids", "out"}``: per-window summed cross-entropy (float64, natural log) of
  ``logits[:-1]`` against ``ids[1:]`` for each row of ``ids`` ``[N, T]``; saves ``[N]`` to ``out``.
- ``{"kind": "gptqmodel_quantize", "src", "out", "bits", "group_size", "sym", "desc_act", "calib", "seed"}``:
  build a tiny random ``LlamaForCausalLM`` from the HF config dict ``src`` (fp16, ``seed``), quantize it with
  ``GPTQModel`` on CPU using the int64 calibration rows in ``calib`` and save it to ``out`` (the other
  direction: a checkpoint the PyTorch ecosystem wrote).

Task results (timings, kernel class names) go to ``job["report"]`` as JSON. Any failure is a non-zero exit
with the traceback on stderr, naming the task.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.7 needs >= 2 on 2-core machines
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


def _load(folder: str, backend: str | None = None):
    """``AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16)``; with
    ``backend``, GPTQModel's kernel choice is forced (transformers merges the loading attribute)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs = {}
    if backend is not None:
        with open(os.path.join(folder, "config.json")) as f:
            bits = json.load(f)["quantization_config"]["bits"]
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16, **kwargs)
    model.eval()
    return model


def _quant_modules(model) -> dict[str, torch.nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "scales"):
            out[name] = mod
    return out


def _with_fallback(folder: str, fn):
    """Load ``folder`` and return ``(fn(model), model, fallback_note)``.

    GPTQModel 7.7's automatic CPU kernel choice can pick a kernel that then fails on shapes it does not
    support: TorchFusedLinear with group_size=-1 and in_features > 256 (its aten op takes groups of
    32..256) fails in forward; TorchCpuAvx512Linear with in_features % group_size != 0 (SmolLM2's 576 at
    group 128) raises while the model is built. A user would then force the plain torch kernel; do the
    same and report it, so tests can check where this happens.
    """
    try:
        model = _load(folder)
        return fn(model), model, None
    except (RuntimeError, NotImplementedError, ValueError) as e:
        note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        model = _load(folder, backend="torch")
        return fn(model), model, note


@torch.inference_mode()
def task_logits(task: dict) -> dict:
    ids = torch.from_numpy(np.load(task["ids"]).astype(np.int64))
    logits, model, fallback = _with_fallback(task["folder"], lambda m: m(input_ids=ids).logits.float().numpy())
    np.save(task["out"], logits)
    mods = _quant_modules(model)
    if task.get("weights_out"):
        weights = {}
        for name, mod in mods.items():
            eye = torch.eye(int(mod.in_features), dtype=torch.float16)
            y = mod(eye)
            if getattr(mod, "bias", None) is not None:
                y = y - mod.bias.to(y.dtype)
            weights[name] = y.float().numpy()
        np.savez(task["weights_out"], **weights)
    kernels = sorted({type(m).__name__ for m in mods.values()})
    return {"kernels": kernels, "n_quantized": len(mods), "fallback": fallback}


@torch.inference_mode()
def task_ppl(task: dict) -> dict:
    ids = np.load(task["ids"]).astype(np.int64)

    def nll(model) -> list[float]:
        out = []
        for row in ids:
            logits = model(input_ids=torch.from_numpy(row[None])).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), dim=-1)
            tgt = torch.from_numpy(row[1:])
            out.append(float(-logp[torch.arange(len(tgt)), tgt].sum()))
        return out

    values, model, fallback = _with_fallback(task["folder"], nll)
    np.save(task["out"], np.asarray(values, dtype=np.float64))
    return {"kernels": sorted({type(m).__name__ for m in _quant_modules(model).values()}), "fallback": fallback}


def task_gptqmodel_quantize(task: dict) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    src = task["out"] + ".src"
    cfg = LlamaConfig(**task["src"])
    torch.manual_seed(int(task["seed"]))
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights large enough that quantization error shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
    model.to(torch.float16).save_pretrained(src)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2",
                            bos_token="t3").save_pretrained(src)
    qc = QuantizeConfig(bits=int(task["bits"]), group_size=int(task["group_size"]), sym=bool(task["sym"]),
                        desc_act=bool(task["desc_act"]))
    qmodel = GPTQModel.load(src, qc, device="cpu")
    calib = np.load(task["calib"]).astype(np.int64)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib]
    qmodel.quantize(data, batch_size=4)
    qmodel.save(task["out"])
    return {}


TASKS = {"logits": task_logits, "ppl": task_ppl, "gptqmodel_quantize": task_gptqmodel_quantize}


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    report = []
    for i, task in enumerate(job["tasks"]):
        t0 = time.time()
        try:
            result = TASKS[task["kind"]](task)
        except Exception:
            print(f"reader: task {i} ({task.get('kind')}, {task.get('folder', task.get('out'))}) failed:",
                  file=sys.stderr)
            traceback.print_exc()
            return 1
        report.append({"task": i, "kind": task["kind"], "seconds": round(time.time() - t0, 3), **result})
        print(f"reader: task {i} {task['kind']} {task.get('folder', task.get('out'))}: "
              f"{report[-1]['seconds']} s", file=sys.stderr, flush=True)
    with open(job["report"], "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
