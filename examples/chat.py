"""Streaming multi-turn chat with the default model (SmolLM2-135M-Instruct, fetched and converted on first use).

    python examples/chat.py                       # interactive; empty line or Ctrl-D quits, /reset forgets
    python examples/chat.py --prompt "Hi there"   # one answer, then exit
"""
from __future__ import annotations

import argparse
import sys
import time

from alise import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a path to an HF-style Llama folder")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system message (default: the model's own)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                        help="weights and activations (default float32: this 135M model's greedy answers flip on "
                             "close calls in bfloat16, e.g. 'What is the capital of France?'; bfloat16 decodes "
                             "~1.5x faster on a CPU)")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "bf16", "int8", "int4"], help="KV cache storage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile (CPU): ~1.5x faster decoding after about "
                             "a minute of compilation at the first answer")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, scheduler="fcfs", seed=args.seed,
              compile=args.compile)
    if args.compile:   # compile now (one decode step), not in the middle of the first answer
        llm.generate([[0]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(message: str) -> None:
        history.append({"role": "user", "content": message})
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(history))
        start, parts = time.perf_counter(), []
        for delta in llm.stream(prompt, params):
            parts.append(delta)
            print(delta, end="", flush=True)
        history.append({"role": "assistant", "content": "".join(parts)})
        n = len(llm.tokenizer.encode("".join(parts)))
        print(f"\n[{n} tokens, {n / (time.perf_counter() - start):.1f} tokens/s]", file=sys.stderr)

    if args.prompt is not None:
        answer(args.prompt)
        return
    print("alise chat: empty line or Ctrl-D quits, /reset starts over.", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            break
        if not message:
            break
        if message == "/reset":
            del history[int(bool(args.system)):]
            continue
        answer(message)


if __name__ == "__main__":
    main()
