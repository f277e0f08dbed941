"""Gate training (``lserve_hf.calibration.train_gates``) on one GPU: seconds per optimisation step
and peak memory for a random-weight model of the Llama-3-8B config, bf16, at a given context
length (speed does not depend on the weights). The tokenizer is a small byte-level BPE trained
here on the built-in haystack, since no hub tokenizer is reachable offline.

    python benchmarks/bench_calibration.py --length 16384 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lserve_hf.benchmarks.common import save_json


def offline_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lserve_hf.calibration.gates import WORDS
    from lserve_hf.evaluation.tasks import haystack_sentences

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(haystack_sentences("essay", 0, n=2000) + [" ".join(WORDS)] * 20, vocab_size=4000,
                            min_frequency=2, show_progress=False, special_tokens=["<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def main(argv=None):
    from lserve_hf.benchmarks.e2e_child import build_model
    from lserve_hf.calibration import train_gates

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (the first is reported apart)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tok = offline_tokenizer()
    model = build_model(dict(dry_run=False, layers=args.layers, seed=0), "cuda")
    torch.cuda.reset_peak_memory_stats()
    hist = []
    t0 = time.perf_counter()
    train_gates(model, tok, steps=args.steps, lengths=(args.length, args.length), progress=False,
                callback=lambda step, info: hist.append((time.perf_counter(), info)))
    times = [b[0] - a[0] for a, b in zip([(t0, None)] + hist[:-1], hist)]
    res = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
               config="Llama-3-8B" + (f" ({args.layers} layers)" if args.layers else ""), length=args.length,
               first_step_s=times[0], step_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               loss=[float(h[1]["loss"]) for h in hist])
    print(json.dumps(res, indent=2))
    save_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
