"""Sample text from the shipped Shakespeare base (or any saved text model), and time the cache.

    python code/stage-09/sample_text.py "ROMEO:" --max-new-tokens 300 --temperature 0.8 --top-k 20
    python code/stage-09/sample_text.py "ALICE:" --adapter DIR     # through a saved PEFT adapter
    python code/stage-09/sample_text.py --temperature 0              # greedy
    python code/stage-09/sample_text.py --speed                      # tokens/s with and without cache
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402

from generate import complete, tokens_per_second  # noqa: E402
from peft_model import PeftModel  # noqa: E402
from pretrain_text import PRETRAINED_TEXT_DIR, load_text_base  # noqa: E402

SAMPLING = {"temperature": 0.8, "top_k": 20, "seed": 0}    # the defaults samples are shown with


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="ROMEO:\n")
    p.add_argument("--model", default=PRETRAINED_TEXT_DIR, help="a directory saved by pretrain_text")
    p.add_argument("--adapter", default=None, help="a PEFT adapter directory (save_pretrained)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 = greedy")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"], help="0 = no top-k")
    p.add_argument("--seed", type=int, default=SAMPLING["seed"])
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--speed", action="store_true", help="time generation with and without cache")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    model, tokenizer, _ = load_text_base(a.model)
    if a.adapter:
        model = PeftModel.from_pretrained(model, a.adapter)
    settings = dict(temperature=a.temperature, top_k=a.top_k or None, seed=a.seed)
    print(a.prompt + complete(model, tokenizer, a.prompt, a.max_new_tokens,
                              use_cache=not a.no_cache, **settings))
    if a.speed:
        ids = tokenizer.encode(a.prompt)
        for cached in (True, False):
            rate = tokens_per_second(model, ids, a.max_new_tokens, cached, **settings)
            print(f"{'with' if cached else 'without'} the key/value cache: {rate:,.0f} tokens/s")


if __name__ == "__main__":
    main()
